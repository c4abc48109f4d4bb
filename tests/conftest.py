"""Shared fixtures: small transformers models built from configs (random weights, no hub), and the
test device.

The device: ``LORACAST_TEST_DEVICE=cuda python -m pytest`` (default ``cpu``) runs the suite with
that device as the test device. Tests marked ``on_device`` (a module's ``pytestmark``, or a file
named in `DEVICE_MODULES`) run inside torch's default-device context for it, so the models,
adapters, PEFT oracles and inputs they build land there without per-test edits. Tests marked
``cuda`` need a CUDA device (autocast ``device_type="cuda"``, bitsandbytes' CUDA kernels, NCCL)
and are skipped, with that reason, on any other test device. The `device` fixture gives the test
device to tests that place things themselves.
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

# bitsandbytes logs a missing optional 'kernels' package on import; it is not needed on the CPU.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

DEVICE_VARIABLE = "LORACAST_TEST_DEVICE"
# Existing files whose tests build everything inside the test body (no CPU tensors made at import,
# no explicit CPU generators or device maps), read for that and moved as they stand.
DEVICE_MODULES = frozenset({"test_inject.py", "test_precision_parity.py", "test_cuda_paths.py"})


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
    config.addinivalue_line("markers", "on_device: builds its tensors on the test device (LORACAST_TEST_DEVICE)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device; runs only under LORACAST_TEST_DEVICE=cuda")


def pytest_report_header(config: pytest.Config) -> str:
    name = torch.cuda.get_device_name(TEST_DEVICE) if TEST_DEVICE.type == "cuda" else "cpu"
    return f"loracast test device: {TEST_DEVICE} ({name}; set {DEVICE_VARIABLE} to change)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason=f"needs a CUDA device: run with {DEVICE_VARIABLE}=cuda on a GPU machine "
                                        f"(test device now: {TEST_DEVICE})")
    for item in items:
        if item.path.name in DEVICE_MODULES:
            item.add_marker(pytest.mark.on_device)
        if item.get_closest_marker("cuda") is not None and TEST_DEVICE.type != "cuda":
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


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough to build in milliseconds."""
    from transformers import LlamaConfig

    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    values.update(overrides)
    return LlamaConfig(**values)


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
