"""`prepare_model_for_kbit_training` against PEFT's (the oracle for the default behaviour), and the
upcast choices loracast adds."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import loracast
from loracast.quant.kbit import upcast_parameters
from tests.support.bnb_models import float_linear, linear4bit, load_llama


def _dtypes(model):
    return {name: param.dtype for name, param in model.named_parameters()}


def _input_requires_grad(model):
    seen = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(rg=out.requires_grad))
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 4)))
    handle.remove()
    return seen["rg"]


@pytest.mark.parametrize("bits,kwargs", [
    (4, None), (4, {"use_reentrant": False}), (4, {"use_reentrant": True}), (8, None)])
def test_default_behaviour_equals_peft(bits, kwargs):
    ours = loracast.prepare_model_for_kbit_training(load_llama(bits), gradient_checkpointing_kwargs=kwargs)
    theirs = peft.prepare_model_for_kbit_training(load_llama(bits), gradient_checkpointing_kwargs=kwargs)
    assert _dtypes(ours) == _dtypes(theirs)
    assert _dtypes(ours)["model.embed_tokens.weight"] == torch.float32
    assert _dtypes(ours)["model.norm.weight"] == torch.float32
    assert _dtypes(ours)["lm_head.weight"] == torch.float32
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_activation_checkpointing and theirs.is_activation_checkpointing
    # (transformers' own checkpointing switch hooks the embeddings of input_ids models anyway)
    assert _input_requires_grad(ours) == _input_requires_grad(theirs) is True


def test_no_checkpointing_when_not_asked():
    model = loracast.prepare_model_for_kbit_training(load_llama(4), use_gradient_checkpointing=False)
    assert not model.is_activation_checkpointing
    assert not _input_requires_grad(model)


@pytest.mark.parametrize("upcast,fp32_groups", [
    ("norms", {"norm"}),
    (("norms", "embeddings", "lm_head"), {"norm", "embed_tokens", "lm_head"}),
    (("embeddings",), {"embed_tokens"}),
    ("none", set()),
])
def test_upcast_chooses_the_groups(upcast, fp32_groups):
    model = loracast.prepare_model_for_kbit_training(load_llama(4, storage="bf16"), upcast=upcast)
    for name, dtype in _dtypes(model).items():
        if "proj" in name:  # packed 4-bit weights: never upcast, whatever their storage dtype
            assert dtype == torch.bfloat16, name
            continue
        group = "lm_head" if name.startswith("lm_head") else "embed_tokens" if "embed_tokens" in name else "norm"
        assert dtype == (torch.float32 if group in fp32_groups else torch.bfloat16), name


def test_tied_embeddings_are_upcast_when_either_owner_is_chosen():
    model = load_llama(4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    changed = upcast_parameters(model, ("lm_head",))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    assert len([n for n in changed if "embed_tokens" in n or "lm_head" in n]) == 1


def test_unknown_upcast_group_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['layernorms'\]"):
        loracast.prepare_model_for_kbit_training(load_llama(4), upcast=("norms", "layernorms"))


def test_hand_built_quantized_model():
    model = nn.Sequential(linear4bit(float_linear()), nn.LayerNorm(64)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="use_gradient_checkpointing=False"):
        loracast.prepare_model_for_kbit_training(model)
    model = loracast.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, upcast="norms")
    assert model[1].weight.dtype == torch.float32
    assert model[0].bias.dtype == torch.bfloat16  # "other": not chosen
    assert model[0].weight.dtype == torch.uint8


def test_without_bitsandbytes_loracast_imports_and_works():
    """bitsandbytes is optional: blocked from import, loracast still builds and runs LoRA models."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, loracast\n"
        "from loracast.quant import find_backend\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "m = loracast.prepare_model_for_kbit_training(m)\n"
        "p = loracast.get_peft_model(m, loracast.LoraConfig(r=2, target_modules=['0']))\n"
        "p(torch.randn(2, 8)).sum().backward()\n"
        "p.merge_adapter(); p.unmerge_adapter()\n"
        "assert find_backend(m[0].base_layer) is None\n"
        "assert 'loracast.quant.bnb' not in sys.modules\n"
        "print('ok')\n")
    src = Path(__file__).parents[2] / "src"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
