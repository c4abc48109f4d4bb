"""The precision doctor on a set-up with the usual mistakes (the README's example output).

A tiny Llama is loaded in float16 and given adapters with autocast_adapter_dtype=False, so the
adapters are float16 and train badly; its embedding is left trainable by hand. The doctor is run on
the live model, then on the saved adapter loaded into a float32 copy of the base.

    PYTHONPATH=src python examples/doctor_demo.py [OUT_DIR]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loracast
from loracast import LoraConfig, get_peft_model


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out / "base")  # float32 on disk
    base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float16)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"]), autocast_adapter_dtype=False)
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)

    print(">>> print(loracast.doctor(model))")
    print(loracast.doctor(model).render(rich=False, width=110))

    model.save_pretrained(out / "adapter")
    command = ["loracast", "doctor", str(out / "adapter"), "--base", str(out / "base")]
    print("$ " + " ".join(command).replace(str(out), "out"))
    result = subprocess.run([sys.executable, "-m", "loracast", *command[1:], "--plain"], capture_output=True,
                            text=True, env={"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "COLUMNS": "110"})
    print(result.stdout.replace(str(out), "out"), end="")
    print(f"(exit status {result.returncode})")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
