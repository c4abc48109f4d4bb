"""Each `LoraConfig` field is declared once: the dataclass, its checks, the refused list and the
README's table all come from that declaration, and match PEFT 0.21.2's `LoraConfig`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import peft
import pytest

from loracast import ConfigError, LoraConfig
from loracast.config import init_is_supported, unsupported_options
from loracast.config.lora_config import CONTRIBUTED_CHECKS
from loracast.config.spec import Support, field_specs
from loracast.config.table import TABLE_END, TABLE_START, render_table, replace_table
from loracast.tuner.match import check_patterns

ROOT = Path(__file__).parents[1]
SPECS = field_specs(LoraConfig)
# PEFT's fields that loracast does not declare, and why: never in a saved file (PEFT's to_dict drops it).
NOT_DECLARED = {"runtime_config"}


def _documents_with_the_table() -> list[Path]:
    candidates = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [path for path in candidates if path.is_file() and TABLE_START in path.read_text(encoding="utf-8")]


def test_every_field_but_extra_fields_is_declared_with_a_spec():
    assert [f.name for f in dataclasses.fields(LoraConfig)] == [*SPECS, "extra_fields"]


def test_declared_fields_and_defaults_are_peft_s():
    theirs, ours = peft.LoraConfig(), LoraConfig()
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert peft_fields - set(SPECS) == NOT_DECLARED and set(SPECS) - peft_fields == set()
    assert NOT_DECLARED.isdisjoint(theirs.to_dict())
    for name, (_, default) in SPECS.items():
        assert default == getattr(theirs, name) == getattr(ours, name), name


def test_the_readme_table_is_the_one_the_declarations_render():
    documents = _documents_with_the_table()
    assert documents, f"no document holds the {TABLE_START!r} block"
    for path in documents:
        text = path.read_text(encoding="utf-8")
        assert replace_table(text) == text, f"{path.name}: run python -m loracast.config.table {path.name}"


def test_the_table_names_every_field_once_under_its_support():
    table = render_table()
    for name, (spec, _) in SPECS.items():
        rows = [row for row in table.splitlines() if f"`{name}`" in row.split("|")[1]]
        assert len(rows) == 1 + len(spec.value_rows) - bool(spec.value_rows), name
        assert f"| {spec.support.value}" in rows[0], name


def test_replace_table_fills_the_marked_block_and_refuses_a_text_without_one():
    text = f"intro\n{TABLE_START}\nstale\n{TABLE_END}\noutro\n"
    assert replace_table(text) == f"intro\n{TABLE_START}\n{render_table()}{TABLE_END}\noutro\n"
    with pytest.raises(ValueError, match="block to fill"):
        replace_table("no markers")


@pytest.mark.parametrize("name", [name for name, (spec, _) in SPECS.items() if spec.support is Support.REFUSED])
def test_a_refused_field_set_to_anything_else_is_refused_with_its_reason(name):
    spec, default = SPECS[name]
    value = True if default is False else {"set": 1}
    with pytest.raises(ConfigError) as info:
        LoraConfig(**{name: value})
    assert info.value.field == name and spec.note in str(info.value) and "use PEFT" in str(info.value)
    assert unsupported_options({name: value}) == {name: value}
    assert unsupported_options({name: default}) == {}


def test_only_refused_fields_and_unimplemented_starts_are_unsupported_options():
    assert unsupported_options(LoraConfig(use_dora=True, init_lora_weights="olora").to_dict()) == {}
    assert unsupported_options({"init_lora_weights": "eva"}) == {"init_lora_weights": "eva"}


def test_pissa_niter_takes_a_number_of_iterations():
    assert init_is_supported("pissa_niter_4") and not init_is_supported("pissa_niter_K")
    assert not init_is_supported(1) and init_is_supported(False)


def test_normalising_is_a_step_before_checking_and_checking_changes_nothing():
    config = LoraConfig(target_modules=["q", "v"], target_parameters=["a.w"], trainable_token_indices=[3])
    config.target_modules, config.modules_to_save = {"v", "q", "k"}, ("head",)
    config.trainable_token_indices, config.rank_pattern = {"embed": (1, 2)}, None
    with pytest.raises(ConfigError) as info:
        config.check()  # a set is a spelling the checks do not accept: normalising comes first
    assert info.value.field == "target_modules" and config.target_modules == {"v", "q", "k"}
    config.normalise()
    before = dataclasses.asdict(config)
    config.check()
    assert dataclasses.asdict(config) == before
    assert before["target_modules"] == ["k", "q", "v"] and before["modules_to_save"] == ["head"]
    assert before["trainable_token_indices"] == {"embed": [1, 2]} and before["rank_pattern"] == {}


def test_normalising_leaves_what_it_cannot_convert_for_the_checks_to_name():
    with pytest.raises(ConfigError, match="list of module names") as info:
        LoraConfig(target_modules={1, "q"})
    assert info.value.field == "target_modules"


def test_the_matcher_checks_its_patterns_when_the_config_is_built():
    assert check_patterns in CONTRIBUTED_CHECKS
    for field, value in (("rank_pattern", {"(": 4}), ("target_modules", "q_proj("), ("modules_to_save", ["["]),
                         ("exclude_modules", "*")):
        with pytest.raises(ConfigError, match="valid regular expression") as info:
            LoraConfig(**{field: value})
        assert info.value.field == field
    with pytest.raises(ConfigError, match="valid regular expression") as info:
        LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern="(?P<idx>x)")
    assert info.value.field == "layers_pattern"  # valid alone, not inside the matcher's regex


def test_the_help_users_read_is_the_declared_help():
    for f in dataclasses.fields(LoraConfig):
        if f.name in SPECS:
            spec = SPECS[f.name][0]
            assert f.metadata["help"] == spec.help, f.name
            assert spec.help.startswith("Not implemented") == (spec.support is Support.REFUSED), f.name
