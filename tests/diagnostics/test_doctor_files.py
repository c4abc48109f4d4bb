"""The doctor on PEFT-written adapter files (no fingerprint) loaded into a base: the file's dtype
against the dtype it loads in and the base's dtype, and a no-fingerprint fix that keeps the
file's dtypes. Each test builds the state with PEFT, runs the doctor, applies the printed fix
and shows the failing step succeeding (outputs as in training, or the drift gone).

loracast's own files carry a fingerprint, where `environment-changed` and
`adapter-dtype-changed` name the same situations (tests/diagnostics/test_doctor.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loracast import PeftModel, doctor
from loracast.files.format import WEIGHTS_NAME
from tests.support.doctor_fixes import apply_fix, the
from tests.support.models import tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A float32 tiny Llama saved as a transformers folder (the 'name' users load)."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return str(folder)


def peft_adapter(base_dir: str, dtype: torch.dtype, out) -> torch.Tensor:
    """PEFT adapters trained (randomised) on a `dtype` base with autocast_adapter_dtype=False, saved to
    `out` (a `dtype` file); returns the training-time logits, the reference."""
    import peft

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"]), autocast_adapter_dtype=False)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.2).to(dtype)
    model.save_pretrained(str(out))
    with torch.no_grad():
        return model(IDS).logits.float()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_bf16_file_loaded_as_fp32_computes_as_trained_after_the_fix(base_dir, tmp_path):
    """A PEFT bf16 adapter loaded with the defaults computes in fp32 (huggingface/peft#2421: "fp16/bf16
    adapters load as fp32"); the doctor said "file bf16, adapter fp32" in its table and nothing else.
    Oracle: PEFT's own logits at training time; tolerance 0 after the fix (same dtypes, same arithmetic)."""
    reference = peft_adapter(base_dir, torch.bfloat16, tmp_path)
    report = doctor(tmp_path, base=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16))
    finding = the(report, "file-dtype-differs")
    assert finding.severity == "warning" and "file bfloat16, loaded float32" in finding.seen[0]
    default = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16), str(tmp_path))
    assert (logits(default) - reference).abs().max() > 0  # the failing state: outputs differ from training
    fixed = apply_fix(finding, base_model=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                      path=str(tmp_path))["model"]
    torch.testing.assert_close(logits(fixed), reference, rtol=0, atol=0)


def test_fp16_file_merged_into_a_bf16_base_drifts_until_the_base_dtype_matches(base_dir, tmp_path):
    """An adapter trained on an fp16 base, merged into the base loaded in another dtype: the merged
    model's outputs drift from training (huggingface/peft#1388: loss 2.1178 -> 2.1214 after
    merge_and_unload on a base loaded in another dtype; #2502). Oracle: PEFT's training-time logits;
    the fix's merged model must drift at most 1/4 as much (fp16 keeps 3 more bits than bf16)."""
    reference = peft_adapter(base_dir, torch.float16, tmp_path)
    bf16_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    drifted = (logits(PeftModel.from_pretrained(bf16_base, str(tmp_path)).merge_and_unload()) - reference).abs().max()
    report = doctor(tmp_path, base=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16))
    finding = the(report, "base-dtype-unlike-file")
    assert "file float16, base bfloat16" in finding.seen[0] and "float16" in finding.fix
    merged = apply_fix(finding, name=base_dir, path=str(tmp_path))["merged"]
    after = (logits(merged) - reference).abs().max()
    assert after <= drifted / 4, (float(after), float(drifted))


def test_no_fingerprint_fix_keeps_the_files_dtypes(base_dir, tmp_path):
    """Issue 12/16: following the no-fingerprint fix used to rewrite a bf16-trained PEFT adapter as fp32
    and the doctor then reported it clean. The fix must write the same values in the same dtypes, add
    a fingerprint, and leave the original folder as it was. Oracle: the original file, bit for bit."""
    peft_adapter(base_dir, torch.bfloat16, tmp_path / "ad")
    original = load_file(tmp_path / "ad" / WEIGHTS_NAME)
    finding = the(doctor(tmp_path / "ad"), "no-fingerprint")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    apply_fix(finding, base_model=base, path=str(tmp_path / "ad"))
    rewritten = load_file(tmp_path / "ad-fingerprinted" / WEIGHTS_NAME)
    assert rewritten.keys() == original.keys()
    for key, tensor in original.items():
        assert rewritten[key].dtype == torch.bfloat16 and torch.equal(rewritten[key], tensor), key
    assert load_file(tmp_path / "ad" / WEIGHTS_NAME).keys() == original.keys()  # the original is untouched
    alone = doctor(tmp_path / "ad-fingerprinted")
    assert alone.findings == [] and alone.rows[0]["dtypes"] == {"A": "bfloat16", "B": "bfloat16"}
    # the evidence now lives in the fingerprint: loading with the defaults (fp32) is named, and its fix loads bf16
    loaded = doctor(tmp_path / "ad-fingerprinted", base=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16))
    assert loaded.ids == ["adapter-dtype-changed"] and "bfloat16 at save, float32 now" in loaded.findings[0].seen[0]
