"""Per-sample adapter routing changes no module while it runs, so concurrent calls stay apart."""

from __future__ import annotations

import threading

import torch
from tests.models import randomize_adapters
from torch import nn

from loracast import LoraConfig, get_peft_model

ROUTES = (["a", "b", "__base__", "a"], ["b", "__base__", "b", "a"])


def _two_adapter_model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    targets = [str(i) for i in range(8)]
    model = get_peft_model(base, LoraConfig(target_modules=targets, modules_to_save=["7"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=targets, modules_to_save=["7"]))
    randomize_adapters(model, seed=1)
    for name in ("a", "b"):  # distinct head copies, so a sample sent to the wrong copy shows
        with torch.no_grad():
            model.base_model.model[7].modules_to_save[name].weight.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


def _expected(model: nn.Module, x: torch.Tensor, route: list[str]) -> torch.Tensor:
    """Oracle: each sample alone through its adapter, activated the ordinary way (no routing)."""
    rows = []
    for i, name in enumerate(route):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(x[i:i + 1]))
        else:
            model.set_adapter(name)
            rows.append(model(x[i:i + 1]))
    model.set_adapter("a")
    return torch.cat(rows)


def test_two_threads_route_one_model_independently():
    model = _two_adapter_model()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = [_expected(model, x, route) for route in ROUTES]
        assert not torch.equal(expected[0], expected[1])
        start = threading.Barrier(2)
        wrong: list[str] = []

        def run(which: int) -> None:
            start.wait()
            for step in range(40):
                out = model(x, adapter_names=ROUTES[which])
                # oracle: the same sample through its own adapter; rows are independent, so equal up to
                # the batch-size dependence of the matmul kernels (fp32 atol 1e-5)
                if not torch.allclose(out, expected[which], atol=1e-5, rtol=0):
                    wrong.append(f"thread {which} step {step}: max error {(out - expected[which]).abs().max():.3g}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert wrong == []


def test_routing_leaves_no_trace_and_nests():
    """After a routed call, and inside it for a nested plain call, layers run their active adapter."""
    model = _two_adapter_model()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x)
        seen = []
        hook = model.base_model.model[3].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        model(x, adapter_names=ROUTES[0])
        hook.remove()
        assert torch.equal(model(x), plain)
        assert not torch.equal(seen[0], plain)  # the routed call did route
    layer = model.base_model.model[0]
    assert not any("adapter_names" in key for key in vars(layer))


def test_a_compiled_model_has_no_graph_break_and_still_routes():
    """Unrouted, torch.compile traces every LoRA layer in one graph (the routing state it reads is an
    integer, not the context variable it cannot trace); routed, it recompiles and routes. Oracle for
    the routed output: the same call run eagerly (fp32, atol 1e-5); the "eager" compile backend keeps
    the test cheap (dynamo's tracing is what is tested, not inductor's kernels)."""
    model = _two_adapter_model()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1)
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            expected = model(x, adapter_names=ROUTES[0])
            torch.testing.assert_close(compiled(x, adapter_names=ROUTES[0]), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    finally:
        torch._dynamo.reset()
