"""The package imports and its command line answers --help."""

import subprocess
import sys

import loracast


def test_public_surface():
    for name in ("LoraConfig", "get_peft_model", "PeftModel"):
        assert name in loracast.__all__


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "loracast", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": "src", "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0
    assert "usage: loracast" in out.stdout


def test_every_loracast_exception_is_a_loracast_error():
    """One error family: callers and the CLI catch `LoracastError`; each is still a ValueError."""
    import importlib
    import inspect
    import pkgutil

    found = []
    for info in pkgutil.walk_packages(loracast.__path__, "loracast."):
        if info.name == "loracast.__main__":  # importing it runs the CLI
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception) and not issubclass(cls, Warning):
                found.append(cls)
    assert len(found) >= 10
    outside = [c.__qualname__ for c in found if not issubclass(c, loracast.LoracastError)]
    assert outside == []
    assert all(issubclass(c, ValueError) for c in found)


def test_misuse_of_a_peft_model_raises_loracast_errors():
    """Bad calls on a model (unknown adapter, a second wrap, forward while merged with per-sample
    names) raise the LoracastError family, so callers catch one type."""
    import pytest
    import torch
    from torch import nn

    model = loracast.get_peft_model(nn.Sequential(nn.Linear(4, 4)), loracast.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(loracast.LoracastError, match="not found"):
        model.set_adapter("missing")
    with pytest.raises(loracast.LoracastError, match="already is a PeftModel"):
        loracast.get_peft_model(model, loracast.LoraConfig(r=2, target_modules=["0"]))
    model.merge_adapter()
    with pytest.raises(loracast.LoracastError, match="merged"):
        model(torch.ones(1, 4), adapter_names=["default"])
