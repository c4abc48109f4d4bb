"""Shared fixtures: small transformers models built from configs (random weights, no hub), and the
test device.

The device: ``LORACAST_TEST_DEVICE=cuda python -m pytest`` (default ``cpu``) runs the suite with
that device as the test device. Tests marked ``on_device`` (a module's ``pytestmark``, or a file
named in `DEVICE_MODULES`) run inside torch's default-device context for it, so the models,
adapters, PEFT oracles and inputs they build land there without per-test edits. Tests marked
``gpu`` need a CUDA device (autocast ``device_type="cuda"``, bitsandbytes' CUDA kernels, NCCL)
and are skipped, with that reason, on any other test device. The `device` fixture gives the test
device to tests that place things themselves. The markers are registered in pyproject.toml.

The fixtures of the command-line, training and export tests (a tiny BERT, a tiny Llama and its GGUF,
data files) come from `tests.support.cli_fixtures`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

from tests.support.models import tiny_llama_config

pytest_plugins = ["tests.support.cli_fixtures"]

# bitsandbytes logs a missing optional 'kernels' package on import; it is not needed on the CPU.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

DEVICE_VARIABLE = "LORACAST_TEST_DEVICE"
TESTS = Path(__file__).resolve().parent
# Existing files whose tests build everything inside the test body (no CPU tensors made at import,
# no explicit CPU generators or device maps), read for that and moved as they stand; paths under tests/.
DEVICE_MODULES = frozenset({"tuner/test_inject.py", "parity/test_adapter_dtypes.py", "test_cuda_paths.py"})


def read_test_device(environ: dict[str, str] | os._Environ = os.environ) -> torch.device:
    """The device named by LORACAST_TEST_DEVICE (default cpu).

    Raises:
        pytest.UsageError: the name is not a torch device, or names CUDA where none is available.
    """
    name = environ.get(DEVICE_VARIABLE, "").strip() or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={name!r} is not a torch device name; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={name} but torch {torch.__version__} sees no CUDA device; "
                                "run on a machine with a GPU and a CUDA build of torch, or unset it")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={name}: only cpu and cuda are supported")
    return device


TEST_DEVICE = torch.device("cpu")


def pytest_configure(config: pytest.Config) -> None:
    global TEST_DEVICE
    TEST_DEVICE = read_test_device()


def pytest_report_header(config: pytest.Config) -> str:
    name = torch.cuda.get_device_name(TEST_DEVICE) if TEST_DEVICE.type == "cuda" else "cpu"
    return f"loracast test device: {TEST_DEVICE} ({name}; set {DEVICE_VARIABLE} to change)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason=f"needs a CUDA device: run with {DEVICE_VARIABLE}=cuda on a GPU machine "
                                        f"(test device now: {TEST_DEVICE})")
    for item in items:
        if item.path.is_relative_to(TESTS) and item.path.relative_to(TESTS).as_posix() in DEVICE_MODULES:
            item.add_marker(pytest.mark.on_device)
        if item.get_closest_marker("gpu") is not None and TEST_DEVICE.type != "cuda":
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _on_test_device(request: pytest.FixtureRequest):
    """Tests marked on_device run inside torch's default-device context of the test device (the
    context also on the CPU, so that path runs in every CI run); it ends with the test."""
    if request.node.get_closest_marker("on_device") is None:
        yield
        return
    with torch.device(TEST_DEVICE):
        yield


@pytest.fixture
def device() -> torch.device:
    """The test device (LORACAST_TEST_DEVICE, default cpu)."""
    return TEST_DEVICE


@pytest.fixture
def make_llama():
    """Factory: the same randomly initialised tiny Llama each call, in the requested dtype (on the
    test device when the test is marked on_device: the weights are drawn there)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config())
    state = {k: v.clone() for k, v in reference.state_dict().items()}

    def build(dtype: torch.dtype = torch.float32):
        model = LlamaForCausalLM(tiny_llama_config())
        model.load_state_dict(state)
        return model.to(dtype).eval()

    return build
