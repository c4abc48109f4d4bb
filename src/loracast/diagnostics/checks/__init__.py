"""The doctor's checks, one module per area; each declares its kinds of finding and registers its
checks in `registry`.

Read in this order (also the order checks run, and findings of one severity are reported, in):
`adapters` (the adapter tensors), `training` (what requires grad), `quantization` (adapters on
quantized layers), `base` (the frozen base), `fsdp`, `files` (saved adapters and fingerprints),
`options` (adapter configs). The catalogue of finding ids is `loracast.diagnostics.catalogue`.
"""

from __future__ import annotations

# Imported for their registrations, in the order the checks run in (kept out of isort's sorting).
# isort: off
from loracast.diagnostics.checks import adapters, training, quantization, base, fsdp, files, options  # noqa: F401
# isort: on
from loracast.diagnostics.checks.registry import CHECKS, KINDS, Check, FindingKind, run_checks

__all__ = ["CHECKS", "KINDS", "Check", "FindingKind", "run_checks"]
