"""Build a LoRA model on a small transformers model, train a few steps, save, reload, and show
the adapter dtypes: the short tour of loracast's core."""

from __future__ import annotations

import tempfile
from collections import Counter

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loracast import LoraConfig, PeftModel, get_peft_model


def dtype_summary(model: torch.nn.Module, trainable: bool) -> dict[str, int]:
    """Count parameters per dtype, for trainable or frozen ones."""
    counts: Counter[str] = Counter()
    for param in model.parameters():
        if param.requires_grad == trainable:
            counts[str(param.dtype).removeprefix("torch.")] += param.numel()
    return dict(counts)


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    base = LlamaForCausalLM(config).to(torch.bfloat16)  # a bf16 base, as people fine-tune today
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    print("frozen base :", dtype_summary(model, trainable=False))
    print("adapters    :", dtype_summary(model, trainable=True), "(fp32 by default on a bf16 base)")

    # A toy task: predict the next token of a fixed repeating sequence.
    tokens = torch.arange(32).repeat(4, 2) % config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(30):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        fresh_base = LlamaForCausalLM(config).to(torch.bfloat16)
        fresh_base.load_state_dict(base_weights)
        reloaded = PeftModel.from_pretrained(fresh_base, folder)
        adapter_dtypes = sorted({str(p.dtype) for n, p in reloaded.named_parameters() if "lora_" in n})
        same = torch.equal(model(input_ids=tokens).logits, reloaded(input_ids=tokens).logits)
        print(f"reloaded    : adapters {adapter_dtypes}, logits identical to the trained model: {same}")


if __name__ == "__main__":
    main()
