"""What a trained SmolLM2 adapter gives in other hands: PEFT loading it on the same base, and the
merged model `loracast merge` writes, both compared with loracast's unmerged model on the run's
held-out conversations (greedy answers, token for token, and their exact score).

    PYTHONPATH=src python benchmarks/sft_adapter_checks.py out/demo     # after `make demo`

Reads the run's ``metrics.json`` (model file, data, attention implementation) and
``samples.jsonl`` (which held-out conversations it evaluated, and the answers it recorded).
Every model is loaded the same way (bf16 base, the run's attention implementation) and answers
with loracast's batched greedy generation (`loracast.training.sft.evaluate.answer_examples`).
Not a test: it needs the real model and a trained run; the tests do the same on a tiny Llama.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the output folder of `loracast train` (holds adapter/ and metrics.json)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    from loracast import PeftModel
    from loracast.cli.merge_folder import merge_to_folder
    from loracast.integrations.hf_loading import load_model, quiet_transformers
    from loracast.training.sft.data import read_chat_examples
    from loracast.training.sft.evaluate import answer_examples, score_answers
    from loracast.training.sft.model import load_llm, load_llm_tokenizer

    metrics = json.loads((args.run / "metrics.json").read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in (args.run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    source, adapter = Path(metrics["model"]), args.run / "adapter"
    attention = metrics["train"].get("attention")
    max_new_tokens = metrics["train"]["max_new_tokens"]
    by_line = {e.line: e for e in read_chat_examples(Path(metrics["data"]))}
    held = [by_line[s["line"]] for s in samples]
    references = [s["reference"] for s in samples]
    tokenizer = load_llm_tokenizer(source)
    cpu = torch.device("cpu")

    def base():
        return load_llm(source, torch.bfloat16, False, cpu, attention).eval()

    def answers(model) -> tuple[list[str], float]:
        began = time.perf_counter()
        result = answer_examples(model, tokenizer, held, max_new_tokens, 32, cpu)
        return result, time.perf_counter() - began

    rows = []

    def record(name: str, got: list[str], against: list[str], seconds: float) -> None:
        score = score_answers(got, references)
        equal = sum(a == b for a, b in zip(got, against))
        rows.append({"model": name, "equal_to_loracast": equal, "of": len(got), "exact": score.exact,
                     "valid_json": score.valid_json, "seconds": seconds})

    ours, seconds = answers(PeftModel.from_pretrained(base(), adapter))
    record("loracast (unmerged, adapter reloaded)", ours, [s["adapter"] for s in samples], seconds)
    from peft import PeftModel as PeftPeftModel

    theirs, seconds = answers(PeftPeftModel.from_pretrained(base(), str(adapter)))
    record("PEFT 'PeftModel.from_pretrained' (unmerged)", theirs, ours, seconds)
    with tempfile.TemporaryDirectory() as folder:
        report = merge_to_folder(source, adapter, Path(folder) / "merged", torch.bfloat16)
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            merged = load_model(AutoModelForCausalLM, Path(folder) / "merged", torch.bfloat16,
                                **({"attn_implementation": attention} if attention else {})).eval()
        got, seconds = answers(merged)
    record("merged bf16 folder ('loracast merge', transformers from_pretrained)", got, ours, seconds)

    print(f"{metrics['model_name']}, adapter {adapter} ({metrics['policy']}), {len(held)} held-out conversations, "
          f"greedy, at most {max_new_tokens} new tokens; 'equal' counts answers equal token for token to loracast's "
          "unmerged answers (first row: to the answers the training run recorded)")
    print(f"{'model':<72} {'equal':>8} {'exact':>7} {'JSON':>6} {'s':>6}")
    for row in rows:
        print(f"{row['model']:<72} {row['equal_to_loracast']:>3}/{row['of']:<4} {row['exact']:>7.1%} "
              f"{row['valid_json']:>6.0%} {row['seconds']:>6.1f}")
    print(f"merge report: logits max |diff| {report.max_abs_diff:.3g} (max |logit| {report.max_abs_output:.3g}), "
          f"probe generations equal {report.generations_equal}/{report.generations}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "merge_max_abs_diff": report.max_abs_diff}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
