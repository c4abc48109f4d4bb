"""oneDNN's primitive cache kept small (training/common/onednn.py): set after torch is imported and
before the first bf16 product, the capacity holds (a cycle of shapes longer than it misses on
every call, where the default cache hits on the second pass); a capacity in the environment is
left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loracast.training.common.onednn import CAPACITY_VARIABLE, limit_primitive_cache

# Multiplies bf16 batches of 10 shapes twice over, after limiting the cache or not; oneDNN's verbose
# log says of each primitive whether its creation hit the cache.
_PROBE = """
import sys, torch
from loracast.training.common.onednn import limit_primitive_cache
if sys.argv[1] == "limit":
    print(limit_primitive_cache())
weights = [torch.randn(2, 32 + i, 64, dtype=torch.bfloat16) for i in range(10)]
for _ in range(2):
    for weight in weights:
        torch.bmm(torch.randn(2, 5, weight.shape[1], dtype=torch.bfloat16), weight)
"""


def _cache_hits(mode: str, extra_env: dict[str, str] | None = None) -> tuple[int, int, str]:
    env = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE_CAPACITY" not in k}
    env.update({"ONEDNN_VERBOSE": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src")},
               **(extra_env or {}))
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return out.count("create:cache_hit"), out.count("create:cache_miss"), out.splitlines()[0] if out else ""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch built without oneDNN")
def test_the_capacity_holds_when_set_after_torch_is_imported():
    hits, misses, _ = _cache_hits("default")
    assert (hits, misses) == (10, 10)  # the default cache keeps all ten shapes for the second pass
    hits, misses, said = _cache_hits("limit")
    assert said == "True" and (hits, misses) == (0, 20)  # eight kept: a cycle of ten always misses


def test_a_capacity_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv(CAPACITY_VARIABLE, "64")
    assert not limit_primitive_cache()
    assert os.environ[CAPACITY_VARIABLE] == "64"
    monkeypatch.delenv(CAPACITY_VARIABLE)
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "64")
    assert not limit_primitive_cache()
    assert CAPACITY_VARIABLE not in os.environ
