"""PiSSA / OLoRA on a bf16 base: how far each library's start is from the original weight.

Both libraries move the principal part of W into the adapter and leave a residual in the base.
For one bf16 linear layer (a random matrix with a decaying spectrum, as trained weights have) and
each of loracast and PEFT 0.21.2, two errors against float64 references are printed, as relative
Frobenius norms:

- start: ``|W_res + s * B @ A - W| / |W|``, with the library's own stored W_res, A and B, all
  read exactly in float64. This is how far the adapted model at step 0 is from the original:
  the one rounding of the residual into bf16 is the floor.
- residual: ``|W_res - R64| / |W|``, where R64 = W - s * B64 @ A64 comes from a float64
  decomposition: the error of the residual itself.

    PYTHONPATH=src python benchmarks/init_residual.py [--out 1024 --in 1024 --r 16 --seeds 3]

Deterministic for a given seed (full SVD and QR): figures are medians with min-max over seeds.
"""

from __future__ import annotations

import argparse
import statistics

import peft
import torch
from torch import nn

from loracast import LoraConfig, get_peft_model
from loracast.layers.init.from_base import decompose


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def weight_with_spectrum(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    k = min(rows, cols)
    spectrum = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 0.7
    return ((u[:, :k] * spectrum) @ v[:, :k].T * 0.05).to(torch.bfloat16)


def errors(layer, original: torch.Tensor, init: str, r: int) -> tuple[float, float]:
    scaling = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    base = layer.base_layer.weight.double()
    w = original.double()
    norm = w.norm().item()
    start = (base + scaling * (b @ a) - w).norm().item() / norm
    a64, b64 = decompose(w, init, r, scaling)
    residual = (base - (w - scaling * (b64 @ a64))).norm().item() / norm
    return start, residual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=1024)
    parser.add_argument("--in", dest="inp", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"bf16 Linear({args.inp}, {args.out}), r={args.r}, lora_alpha={2 * args.r}; relative Frobenius errors, "
          f"median [min-max] over {args.seeds} seeds")
    for init in ("pissa", "olora"):
        for flag in (True, False):
            rows = {"loracast": ([], []), "peft": ([], [])}
            for seed in range(args.seeds):
                weight = weight_with_spectrum(args.out, args.inp, seed)
                config = dict(r=args.r, lora_alpha=2 * args.r, target_modules=["proj"], init_lora_weights=init)
                ours = get_peft_model(OneLayer(weight), LoraConfig(**config), autocast_adapter_dtype=flag)
                theirs = peft.get_peft_model(OneLayer(weight), peft.LoraConfig(**config), autocast_adapter_dtype=flag)
                for name, model in (("loracast", ours), ("peft", theirs)):
                    start, residual = errors(model.base_model.model.proj, weight, init, args.r)
                    rows[name][0].append(start)
                    rows[name][1].append(residual)
            adapters = "fp32" if flag else "bf16"
            for name, (starts, residuals) in rows.items():
                print(f"{init:6s} {adapters} adapters  {name:9s} start {_fmt(starts)}   residual {_fmt(residuals)}")


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3e} [{min(values):.3e}-{max(values):.3e}]"


if __name__ == "__main__":
    main()
