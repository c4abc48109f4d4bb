"""Checks of the code's shape that review would otherwise have to catch."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "loracast"

# Methods that nothing in the package calls but that are part of the API users call (PEFT's names; the
# distributed helpers' context, as docs/distributed.md shows it).
CALLED_BY_USERS = {"LoraLayer.set_scale", "PeftModel.print_trainable_parameters", "DistContext.is_main"}
# hooks that transformers' Trainer and accelerate's data loaders call on loracast's subclasses and callbacks
CALLED_BY_LIBRARIES = {"StepClock.on_step_begin", "ProgressBar.on_train_begin", "ProgressBar.on_log",
                       "ProgressBar.on_train_end", "SftTrainer.get_train_dataloader", "LengthGroupedBatches.set_epoch",
                       "ClassifierTrainer.create_scheduler"}


def _sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_dead_code():
    """Every function, class and method the package defines is named somewhere else in it (a
    call, an import, an ``__all__`` entry): code only the tests reach is dead code."""
    sources = _sources()
    named = Counter(re.findall(r"\w+", "\n".join(sources.values())))  # word -> occurrences
    dead = []
    for path, source in sources.items():
        for node in ast.parse(source).body:
            candidates = [(node.name, node.name)] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
            if isinstance(node, ast.ClassDef):
                candidates += [(f"{node.name}.{m.name}", m.name) for m in node.body
                               if isinstance(m, ast.FunctionDef) and not m.name.startswith("__")]
            for qualified, name in candidates:
                if qualified not in CALLED_BY_USERS | CALLED_BY_LIBRARIES and named[name] < 2:
                    dead.append(f"{path.relative_to(PACKAGE)}: {qualified}")
    assert dead == []


def test_public_constructor_has_no_private_keywords():
    """`PeftModel(...)` takes PEFT's arguments (plus `adapter_dtype`, `precision`); loading builds
    its half-made model through a private factory instead of private constructor keywords."""
    import inspect

    import peft

    from loracast import PeftModel

    ours = inspect.signature(PeftModel).parameters
    assert [name for name in ours if name.startswith("_")] == []
    theirs = inspect.signature(peft.PeftModel).parameters
    shared = [name for name in theirs if name in ours]
    assert shared == ["model", "peft_config", "adapter_name", "autocast_adapter_dtype", "low_cpu_mem_usage"]


# (what, pattern, the modules allowed to hold it): each fact is written in one place.
ONE_SOURCE = [
    ("the LoRA scaling formula", r"alpha\s*/\s*(math\.sqrt\(r\)|\(?r\s*\*\*|r\b)", {"config/lora_config.py"}),
    ("a table of dtype names", r"[\"'](bf16|fp16|fp32)[\"']\s*:", {"dtypes.py"}),
    ("adapter-parameter names", r"[\"']\.lora_[\"']|startswith\([\"']lora_|[\"']\.modules_to_save\.[\"']",
     {"precision/view.py"}),
    ("ACCELERATE_USE_FSDP's spellings", r"ACCELERATE_USE_FSDP[\"']", {"distributed/accelerate_env.py"}),
    ("bitsandbytes class names", r"__name__\s*[!=]=\s*[\"'](Linear4bit|Params4bit|Linear8bitLt|Int8Params)", set()),
    ("the CPU-repack undo", r"_convert_weight_packed_for_cpu_inverse\b", {"quant/bnb.py"}),
]


def test_each_fact_has_one_source():
    """The scaling formula, dtype names, what counts as an adapter parameter, accelerate's FSDP flag,
    bitsandbytes' layer types (only through a `QuantBackend`) and the CPU-repack undo are each
    written once."""
    found = {what: set() for what, _, _ in ONE_SOURCE}
    for path, source in _sources().items():
        code = re.sub(r'"""[\s\S]*?"""', "", source)  # docstrings and comments may name them
        code = "\n".join(line.split("#")[0] for line in code.splitlines())
        for what, pattern, _ in ONE_SOURCE:
            if re.search(pattern, code):
                found[what].add(path.relative_to(PACKAGE).as_posix())
    assert {what: places - allowed for (what, _, allowed), places in zip(ONE_SOURCE, found.values())} == \
        {what: set() for what, _, _ in ONE_SOURCE}
