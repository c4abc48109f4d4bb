"""How LoRA Linear layers compute their branch, as functions of the layer (typed by `layer.ComputeLayer`).

- `modes`: the two compute modes, "exact" (PEFT's arithmetic, bit for bit; the default) and
  "fast" (the branch in the activation dtype), and `set_lora_compute` / `get_lora_compute`.
- `dispatch`: which path one forward call takes (the layer's mode, or the general path).
- `exact`, `fast`: the two paths; `widen`: the exact first matmul on a narrower input;
  `direct`: which modules the paths may bypass.

Nothing here imports a layer kind: `ComputeLayer` declares the members these functions read, a
LoRA `Linear` provides them, and `layers/linear.py` imports this package, never the reverse.
"""
