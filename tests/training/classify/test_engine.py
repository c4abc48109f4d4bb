"""The classifier job on transformers' `Trainer` trains what a plain PyTorch loop trains: the
oracle below, on a tiny BERT whose dropout is on (so the random stream matters too).

The oracle's semantics, each one a default of the trainer that `classify.engine` sets back:
- the learning rate of step k is peak * k / warm-up during the warm-up (step 1 trains; the
  trainer's schedules give it 0), and the warm-up is the ratio's steps rounded down (10 steps x
  0.3 is 3.0000000000000004 in floats, which transformers rounds up to 4);
- torch's AdamW with its defaults and no weight decay, and no gradient clipping (the trainer
  clips at norm 1 by default; these gradients are larger);
- one seeded permutation of the rows per epoch, cut into batches;
- dropout draws from the generator as the model's initialisation left it (the trainer seeds it
  again when built).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loracast.cli import main
from loracast.training.classify.data import load_data
from loracast.training.classify.evaluate import encode
from loracast.training.classify.model import ModelSpec, build_classifier

LR, BATCH, EPOCHS, WARMUP_RATIO, MAX_LENGTH, SEED = 1e-2, 16, 2, 0.3, 32, 3


def reference_loop(model_folder: Path, data: Path, out: Path) -> tuple[list[float], list[float], list[float]]:
    """(loss, learning rate, gradient norm) of each step of a plain loop; its adapter saved in `out`."""
    train, _, _ = load_data(data, None, 0.2, SEED)
    model, tokenizer = build_classifier(ModelSpec(folder=model_folder, seed=SEED), train.label_names, "stable",
                                        torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    per_epoch = -(-len(train) // BATCH)
    total, warmup = per_epoch * EPOCHS, 3
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else (total - s) / (total - warmup))
    generator = torch.Generator().manual_seed(SEED)
    losses, lrs, norms = [], [], []
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            inputs = encode(tokenizer, [train.texts[i] for i in rows], MAX_LENGTH)
            labels = torch.tensor([train.labels[i] for i in rows])
            loss = F.cross_entropy(model(**inputs).logits.float(), labels)
            loss.backward()
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
    model.save_pretrained(out)
    return losses, lrs, norms


def test_the_trainer_trains_what_the_plain_loop_trains(tmp_path, tiny_bert, tiny_data):
    losses, lrs, norms = reference_loop(tiny_bert, tiny_data, tmp_path / "reference")
    # the oracle is the schedule it claims: step 1 at a third of the peak, the peak at steps 3 and 4, then linear decay
    assert len(lrs) == 10
    torch.testing.assert_close(lrs[:5], [LR / 3, 2 * LR / 3, LR, LR, LR * 6 / 7], rtol=1e-12, atol=0)
    torch.testing.assert_close(lrs[-1], LR / 7, rtol=1e-12, atol=0)
    assert max(norms) > 1.0  # clipping at norm 1 would change these steps

    out = tmp_path / "trainer"
    assert main(["train", "classify", "--model", str(tiny_bert), "--data", str(tiny_data), "--out", str(out),
                 "--lr", str(LR), "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--warmup-ratio",
                 str(WARMUP_RATIO), "--max-length", str(MAX_LENGTH), "--seed", str(SEED), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    torch.testing.assert_close([s["loss"] for s in metrics["history"]["steps"]], losses, rtol=1e-6, atol=0)
    ours, theirs = load_file(str(out / "adapter" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
