"""The trainer pipelines with the peft package absent: a fresh process where ``import peft`` fails
(``sys.modules['peft'] = None``, set in that process before anything is imported, so transformers
and TRL find no peft either). Oracle: the same checks as tests/integrations/test_trainer_pipelines.py, on
loracast alone: adapter-only checkpoints, the checkpoint's values restored on resume, TRL training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
sys.modules["peft"] = None  # `import peft` raises ImportError from here on
import os, torch
import transformers.utils
assert not transformers.utils.is_peft_available()
from tests.support.pipelines import adapted, arguments, lora_values, rows, sft_args, sft_rows, word_tokenizer
import loracast
from loracast.training.trainers import SFTTrainer, Trainer

out = sys.argv[1]
first = adapted(loracast)
Trainer(model=first, args=arguments(out + "/first", max_steps=2), train_dataset=rows()).train()
files = set(os.listdir(out + "/first/checkpoint-2"))
assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files, files
resumed = adapted(loracast, seed=7)
trainer = Trainer(model=resumed, args=arguments(out + "/resumed", max_steps=2), train_dataset=rows())
trainer.train(resume_from_checkpoint=out + "/first/checkpoint-2")  # at max_steps already: loads, trains no step
expected = lora_values(first)
assert all(torch.equal(v, expected[k]) for k, v in lora_values(resumed).items())

config = loracast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
trainer = SFTTrainer(model=adapted(loracast).get_base_model(), args=sft_args(out + "/sft", defaults=False, max_steps=1),
                     train_dataset=sft_rows(), processing_class=word_tokenizer())
trainer.train()
trainer.save_model(out + "/sft/final")
assert "adapter_model.safetensors" in os.listdir(out + "/sft/final")
print("PIPELINES WITHOUT PEFT OK")
"""


def test_trainer_and_sft_trainer_work_without_the_peft_package(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin",
                                              "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PIPELINES WITHOUT PEFT OK" in result.stdout
