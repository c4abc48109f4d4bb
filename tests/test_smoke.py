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
