"""The precision doctor: every finding triggered by a model or folder built to show it, a clean
model and folder reporting nothing, the table and JSON, and the command line's exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loracast
from conftest import tiny_llama_config
from fake_quant import fake_backend, quantize  # noqa: F401  (fixture)
from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.cli import main
from loracast.diagnostics import Report, UnreadableInput, doctor
from loracast.diagnostics.checks import CHECKS, KINDS
from loracast.files import fingerprint as fp
from loracast.files.format import WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(**extra) -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"], **extra)


def lora_a(model, layer: int = 0) -> torch.Tensor:
    return model.base_model.model.model.layers[layer].self_attn.q_proj.lora_A["default"].weight


def the(report: Report, finding_id: str):
    found = [f for f in report.findings if f.id == finding_id]
    assert len(found) == 1, report.ids
    return found[0]


# -- clean ----------------------------------------------------------------------------------------

def test_a_clean_model_and_its_folder_report_nothing(make_llama, tmp_path):
    model = get_peft_model(make_llama(torch.bfloat16), config(modules_to_save=["lm_head"]))
    report = doctor(model)
    assert report.findings == [] and report.exit_status == 0
    assert {r["module"] for r in report.rows} == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                  for p in ("q_proj", "v_proj")} | {"lm_head"}
    row = next(r for r in report.rows if r["module"] == "model.layers.0.self_attn.q_proj")
    assert row["base"] == "bfloat16" and row["dtypes"] == {"A": "float32", "B": "float32"}
    assert row["requires_grad"] is True and row["device"] == "cpu"
    summary = {entry["dtype"]: entry for entry in report.summary}
    assert summary["float32"]["adapter_tensors"] == 8 and summary["float32"]["modules_to_save_tensors"] == 1
    assert summary["bfloat16"]["base_layers_stored"] == 5
    model.save_pretrained(tmp_path)
    folder = doctor(tmp_path)
    assert folder.findings == [] and folder.kind == "adapter folder"
    assert doctor(tmp_path, base=make_llama(torch.bfloat16)).findings == []


def test_every_finding_id_is_asserted_by_a_doctor_test():
    """Each registered kind of finding is triggered and asserted by name in some doctor test."""
    text = "".join(path.read_text() for path in Path(__file__).parent.glob("test_doctor*.py"))
    text += "".join(path.read_text() for path in (Path(__file__).parent / "diagnostics").glob("test_*.py"))
    assert len(KINDS) == 28, sorted(KINDS)
    missing = [i for i in KINDS if f'"{i}"' not in text]
    assert not missing, f"no test asserts these finding ids: {missing}"
    assert {kind.id for check in CHECKS for kind in check.kinds} == set(KINDS)  # every kind has a check


# -- live-model findings ----------------------------------------------------------------------------

def test_no_adapters(make_llama):
    report = doctor(make_llama())
    assert report.ids == ["no-adapters"] and report.exit_status == 0
    assert report.summary[0]["base_parameters"] == 21


@pytest.mark.parametrize("source", ["live", "folder"])
def test_mixed_lora_compute(make_llama, tmp_path, source):
    """'default' shares its q_proj layers with an adapter made with precision='mixed', which switched
    them to fast: the doctor reports the adapter whose layers disagree, live or saved."""
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("m", LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), precision="mixed")
    if source == "folder":
        model.save_pretrained(tmp_path)
    found = the(doctor(model if source == "live" else tmp_path), "mixed-lora-compute")
    assert "'default'" in found.title and "2 layers" in found.title
    assert found.seen == [f"fast: model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert "set_lora_compute(model, \"exact\", adapter_name='default')" in found.fix
    loracast.set_lora_compute(model, "exact")
    assert "mixed-lora-compute" not in doctor(model).ids


def test_mixed_adapter_dtypes(make_llama):
    model = get_peft_model(make_llama(), config())
    model.base_model.model.model.layers[1].self_attn.v_proj.to(torch.bfloat16)  # a partial cast by hand
    finding = the(doctor(model), "mixed-adapter-dtypes")
    assert finding.severity == "warning"
    assert finding.seen[0] == "bfloat16: model.layers.1.self_attn.v_proj [A,B]"
    assert "param.data.to(torch.float32)" in finding.fix


def test_fp16_adapters_being_trained(make_llama):
    model = get_peft_model(make_llama(torch.float16), config(), precision="fast")
    report = doctor(model)
    finding = the(report, "fp16-trainable")
    assert finding.severity == "error" and report.exit_status == 1
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in finding.seen and len(finding.seen) == 8
    frozen = get_peft_model(make_llama(torch.float16), config(inference_mode=True), precision="fast")
    assert "fp16-trainable" not in doctor(frozen).ids  # an fp16 adapter for inference is fine


def test_quantized_compute_dtype_differs_from_adapter(make_llama, fake_backend):
    base = quantize(make_llama(torch.bfloat16), storage=torch.int8, compute=torch.bfloat16)
    model = get_peft_model(base, config(), adapter_dtype=torch.float16, autocast_adapter_dtype=False)
    report = doctor(model)
    finding = the(report, "quant-compute-mismatch")
    assert "model.layers.0.self_attn.q_proj [default]: adapter float16, compute bfloat16" in finding.seen
    row = report.rows[0]
    assert (row["base"], row["compute"], row["quantization"]) == ("int8", "bfloat16", "fake-int8")
    assert {e["dtype"]: e["base_layers_computing"] for e in report.summary}["bfloat16"] == 4
    for good in ("stable", "fast"):
        base = quantize(make_llama(torch.bfloat16), storage=torch.int8, compute=torch.bfloat16)
        assert "quant-compute-mismatch" not in doctor(get_peft_model(base, config(), precision=good)).ids


def test_fsdp_with_integer_storage(make_llama, fake_backend):
    model = get_peft_model(quantize(make_llama(torch.bfloat16), torch.int8, torch.bfloat16), config())
    assert not any(i.startswith("fsdp") for i in doctor(model).ids)  # FSDP neither in use nor requested
    finding = the(doctor(model, fsdp=True), "fsdp-integer-storage")
    assert finding.severity == "error"
    assert "model.layers.0.self_attn.q_proj.base_layer: int8" in finding.seen
    assert "bnb_4bit_quant_storage=torch.bfloat16" in finding.fix


def test_fsdp_with_float_storage_other_than_the_model_dtype(make_llama, fake_backend):
    model = get_peft_model(quantize(make_llama(torch.bfloat16), torch.float32, torch.bfloat16), config(),
                           precision="fast")
    finding = the(doctor(model, fsdp=True), "fsdp-storage-dtype")
    assert finding.severity == "error" and "model.layers.1.self_attn.v_proj.base_layer: float32" in finding.seen


def test_fsdp_with_adapters_in_another_dtype(make_llama, monkeypatch):
    stable = get_peft_model(make_llama(torch.bfloat16), config())
    assert the(doctor(stable, fsdp=True), "fsdp-mixed-dtypes").severity == "warning"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP detected from accelerate's launch
    assert the(doctor(stable), "fsdp-mixed-dtypes").title.startswith("ACCELERATE_USE_FSDP is set, and adapters")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    uniform = get_peft_model(make_llama(torch.bfloat16), config(), precision="fsdp")
    # one dtype, but accelerate's default FSDP1 (one root unit, use_orig_params=False) also needs one
    # requires_grad per unit: only the flattening finding remains, and it goes with use_orig_params=True
    assert doctor(uniform).ids == ["fsdp1-flatten"] and doctor(uniform, fsdp=True).ids == ["fsdp1-flatten"]
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    assert doctor(uniform).findings == [] and doctor(uniform, fsdp=True).findings == []


def test_fsdp1_flattening_is_predicted_from_accelerates_setup(make_llama, monkeypatch):
    stable = get_peft_model(make_llama(torch.bfloat16), config())  # fp32 adapters on a bf16 base
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    finding = the(doctor(stable), "fsdp1-flatten")
    assert finding.severity == "error"  # accelerate's launch says exactly how it will wrap
    assert "TRANSFORMER_BASED_WRAP (LlamaDecoderLayer), use_orig_params=False" in finding.title
    assert finding.title.endswith("would fail to flatten 2 units")
    assert finding.seen[0].startswith("unit 'base_model.model.model.layers.0' holds parameters of several dtypes")
    assert "fsdp1_auto_wrap_policy(model)" in finding.fix
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2 shards each tensor on its own
    assert "fsdp1-flatten" not in doctor(stable).ids


def test_base_weights_requiring_grad(make_llama):
    model = get_peft_model(make_llama(), config())
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    finding = the(doctor(model), "base-requires-grad")
    assert finding.seen == ["model.embed_tokens.weight: float32"]
    biased = get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"], bias="all"))
    assert "base-requires-grad" not in doctor(biased).ids  # biases trained on purpose


def test_non_finite_and_near_fp16_limit_values(make_llama, tmp_path):
    model = get_peft_model(make_llama(), config())
    with torch.no_grad():
        lora_a(model)[0, 0] = float("nan")
        lora_a(model, 1)[0, :3] = 5.0e4
    report = doctor(model)
    assert the(report, "non-finite-adapter").seen == [
        "model.layers.0.self_attn.q_proj.lora_A.default.weight: 1 of 512 values are inf or nan"]
    assert the(report, "near-fp16-limit").seen == ["model.layers.1.self_attn.q_proj.lora_A.default.weight: "
                                                   "max |value| 50000"]
    assert report.exit_status == 1
    model.save_pretrained(tmp_path)
    saved = doctor(tmp_path)
    assert {"non-finite-adapter", "near-fp16-limit"} <= set(saved.ids)


# -- saved adapters ---------------------------------------------------------------------------------

def test_saved_dtype_differs_from_trained(make_llama, tmp_path):
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path / "narrow", save_dtype=torch.bfloat16)
    narrow = the(doctor(tmp_path / "narrow"), "saved-dtype-differs")
    assert narrow.severity == "warning" and len(narrow.seen) == 8
    assert narrow.seen[0].endswith("trained float32, saved bfloat16")
    get_peft_model(make_llama(torch.bfloat16), config(), precision="fast").save_pretrained(
        tmp_path / "wide", save_dtype=torch.float32)
    assert the(doctor(tmp_path / "wide"), "saved-dtype-differs").severity == "info"
    row = doctor(tmp_path / "narrow").rows[0]
    assert row["dtypes"] == {"A": "bfloat16", "B": "bfloat16"} and row["trained"] == {"A": "float32", "B": "float32"}


def test_environment_changed_since_save(make_llama, tmp_path, monkeypatch):
    real = fp.package_version
    monkeypatch.setattr(fp, "package_version", lambda name: "4.0.0" if name == "transformers" else real(name))
    get_peft_model(make_llama(torch.bfloat16), config()).save_pretrained(tmp_path)
    monkeypatch.setattr(fp, "package_version", real)
    folder = the(doctor(tmp_path), "environment-changed")
    assert folder.seen == [f"transformers version: 4.0.0 at save, {real('transformers')} now"]
    assert "pip install transformers==4.0.0" in folder.fix
    loaded = PeftModel.from_pretrained(make_llama(torch.float32), tmp_path)
    seen = the(doctor(loaded), "environment-changed").seen
    assert "base model dtype: bfloat16 at save, float32 now" in seen and len(seen) == 2


def test_adapter_dtype_changed_since_save(make_llama, tmp_path):
    get_peft_model(make_llama(torch.bfloat16), config(), precision="fast").save_pretrained(tmp_path)
    default = the(doctor(PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path)), "adapter-dtype-changed")
    assert default.severity == "warning" and "precision=\"match-training\"" in default.fix
    chosen = PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path, precision="stable")
    assert the(doctor(chosen), "adapter-dtype-changed").severity == "info"
    matched = PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path, precision="match-training")
    assert doctor(matched).findings == []
    with_base = doctor(tmp_path, base=make_llama(torch.bfloat16))
    assert the(with_base, "adapter-dtype-changed").severity == "warning"
    assert with_base.rows[0]["trained"] == {"A": "bfloat16", "B": "bfloat16"}


def test_peft_written_folder_has_no_fingerprint(make_llama, tmp_path, capsys):
    import peft

    peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path))
    assert main(["doctor", str(tmp_path), "--plain"]) == 0
    assert "INFO    no-fingerprint: No precision fingerprint: the adapter was saved by PEFT" in capsys.readouterr().out
    report = doctor(tmp_path)
    assert report.ids == ["no-fingerprint"] and the(report, "no-fingerprint").severity == "info"
    assert len(report.rows) == 4 and report.rows[0]["dtypes"] == {"A": "float32", "B": "float32"}
    live = doctor(peft.PeftModel.from_pretrained(make_llama(torch.bfloat16), str(tmp_path)))
    assert live.findings == [] and live.rows[0]["dtypes"] == {"A": "float32", "B": "float32"}


def test_peft_options_loracast_does_not_implement(make_llama, tmp_path):
    import peft

    replicated = peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=["q_proj"],
                                                                   layer_replication=[[0, 2]]))
    replicated.save_pretrained(str(tmp_path))
    report = doctor(tmp_path)
    assert the(report, "unsupported-peft-options").seen == ["default: layer_replication=[[0, 2]]"]
    assert report.exit_status == 1
    live = doctor(replicated)
    assert the(live, "unsupported-peft-options").severity == "warning"  # it works in PEFT itself
    on_base = doctor(tmp_path, base=make_llama())  # cannot load: reported once, as unsupported
    assert "unsupported-peft-options" in on_base.ids and "adapter-load-failed" not in on_base.ids


def test_dora_magnitude_dtype_is_reported_for_peft_files_and_loracast_models(make_llama, tmp_path):
    import peft

    peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=["q_proj"], use_dora=True)).save_pretrained(
        str(tmp_path))
    report = doctor(tmp_path)
    assert "unsupported-peft-options" not in report.ids
    assert {r["module"]: r["dtypes"] for r in report.rows}["model.layers.0.self_attn.q_proj"] == {
        "A": "float32", "B": "float32", "magnitude": "float32"}
    on_base = doctor(tmp_path, base=make_llama(torch.bfloat16))
    assert "adapter-load-failed" not in on_base.ids and "unsupported-peft-options" not in on_base.ids
    ours = get_peft_model(make_llama(torch.bfloat16), LoraConfig(target_modules=["q_proj"], use_dora=True),
                          autocast_adapter_dtype=False)
    live = doctor(ours)
    assert live.rows[0]["dtypes"] == {"A": "bfloat16", "B": "bfloat16", "magnitude": "bfloat16"}


def test_unknown_peft_fields_and_a_damaged_fingerprint(make_llama, tmp_path):
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    path = tmp_path / WEIGHTS_NAME
    save_file(load_file(path), path, metadata={"format": "pt", fp.FINGERPRINT_KEY: "[1, 2]"})
    report = doctor(tmp_path)
    assert the(report, "unknown-peft-fields").seen == ["default: future_option=3"]
    assert "not a JSON object" in the(report, "fingerprint-unreadable").seen[0]
    assert "no-fingerprint" not in report.ids


def test_adapter_that_does_not_fit_the_base(make_llama, tmp_path):
    from transformers import LlamaForCausalLM

    get_peft_model(make_llama(), config()).save_pretrained(tmp_path)
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    finding = the(doctor(tmp_path, base=other), "adapter-load-failed")
    assert finding.severity == "error" and "has shape (8, 64) but the model expects (8, 32)" in finding.seen[0]


def test_several_adapters_in_one_folder(make_llama, tmp_path):
    model = get_peft_model(make_llama(), config())
    model.add_adapter("second", config(), precision="fast")
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["second"].half()
    model.save_pretrained(tmp_path)
    report = doctor(tmp_path)
    assert {r["adapter"] for r in report.rows} == {"default", "second"}
    finding = the(report, "mixed-adapter-dtypes")  # only 'second' is mixed
    assert finding.title.startswith("Adapter 'second' holds tensors in 2 dtypes")
    assert finding.seen[0] == "float16: model.layers.0.self_attn.q_proj [B]"
    assert "saved-dtype-differs" not in report.ids  # each tensor saved in the dtype it had


# -- output and command line ------------------------------------------------------------------------

def test_text_and_json_output(make_llama):
    model = get_peft_model(make_llama(torch.float16), config(), precision="fast")
    report = doctor(model)
    text = report.render(rich=False)
    assert "model.layers.*.self_attn.q_proj (x2)" in text
    assert "ERROR   fp16-trainable" in text and "fix:" in text
    assert "fp16   8 adapter tensors (3,584 values); 21 base parameters; 4 adapted base layers stored" in text
    full = report.render(rich=False, full=True)
    assert "model.layers.0.self_attn.q_proj " in full and "(x2)" not in full
    assert "fp16-trainable" in report.render(rich=True)
    data = json.loads(report.to_json())
    assert data["exit_status"] == 1 and data["counts"]["error"] == 1
    assert data["findings"][0]["id"] == "fp16-trainable" and data["rows"][0]["dtypes"]["A"] == "float16"


def test_cli_exit_statuses(make_llama, tmp_path, capsys):
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path / "clean")
    assert main(["doctor", str(tmp_path / "clean")]) == 0
    assert "findings: 0 errors" in capsys.readouterr().out
    broken = get_peft_model(make_llama(), config())
    with torch.no_grad():
        lora_a(broken).fill_(float("inf"))
    broken.save_pretrained(tmp_path / "broken")
    assert main(["doctor", str(tmp_path / "broken"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["findings"][0]["id"] == "non-finite-adapter"
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "adapter_config.json").write_text("{oops")
    (tmp_path / "empty").mkdir()
    cases = ((tmp_path / "missing", "does not exist"), (tmp_path / "bad_json", "not valid JSON"),
             (tmp_path, "not valid JSON"),  # a folder of adapters, one of them broken
             (tmp_path / "empty", "no adapter_config.json"), (tmp_path / "clean" / WEIGHTS_NAME, "is a file"))
    for unreadable, says in cases:
        assert main(["doctor", str(unreadable)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and err.startswith("loracast doctor: error:")


def test_cli_loads_the_adapter_into_a_base_folder(make_llama, tmp_path, capsys):
    base = make_llama(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, config(), precision="fast").save_pretrained(tmp_path / "adapter")
    status = main(["doctor", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--plain"])
    out = capsys.readouterr().out
    assert status == 0 and "(adapter folder + base)" in out and "adapter-dtype-changed" in out
    assert main(["doctor", str(tmp_path / "adapter"), "--base", str(tmp_path / "nowhere")]) == 2


def test_cli_unreadable_input_prints_one_line_without_traceback(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "loracast", "doctor", str(tmp_path)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": ""})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("loracast doctor: error: no adapter_model.safetensors")
    assert "Traceback" not in out.stderr


def test_unreadable_inputs_raise_in_the_library(make_llama, tmp_path):
    with pytest.raises(UnreadableInput, match="goes with an adapter folder"):
        doctor(make_llama(), base=make_llama())
    with pytest.raises(UnreadableInput, match="is a file"):
        (tmp_path / "f").write_text("x")
        doctor(tmp_path / "f")
