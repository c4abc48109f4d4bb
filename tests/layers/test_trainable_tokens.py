"""`trainable_token_indices` against PEFT 0.21.2: names, outputs, files both ways, merge, dtypes, training."""

from __future__ import annotations

import peft
import pytest
import torch

from loracast import ConfigError, LoraConfig, PeftModel, get_peft_model
from tests.support.models import tiny_llama_config

IDS = torch.tensor([[1, 3, 5, 7, 9, 3, 100, 7], [5, 5, 2, 7, 3, 11, 12, 9]])
TOKENS = [3, 7, 100]


def llama(tied: bool, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).to(dtype).eval()


def pair(tied: bool, dtype=torch.float32, autocast_adapter_dtype=True, **config):
    """The same base adapted by loracast and by PEFT, trainable rows set to the same random values."""
    config = dict(dict(target_modules=["q_proj"], trainable_token_indices=TOKENS), **config)
    ours = get_peft_model(llama(tied, dtype), LoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)
    theirs = peft.get_peft_model(llama(tied, dtype), peft.LoraConfig(**config),
                                 autocast_adapter_dtype=autocast_adapter_dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (name, mine), (other, their) in zip(_rows(ours), _rows(theirs), strict=True):
            assert name == other
            values = torch.randn(mine.shape, generator=generator) * 0.5
            mine.copy_(values)
            their.copy_(values)
    return ours.eval(), theirs.eval()


def _rows(model):
    return [(n, p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n]


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_names_shapes_and_fp32_outputs_equal_peft(tied):
    ours, theirs = pair(tied)
    mine = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    other = {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine == other and any("token_adapter.trainable_tokens_delta.default" in n for n in mine)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    # oracle: PEFT's fp32 logits; tolerance: float32 rounding of different but equivalent matmul orders
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_files_load_both_ways(tmp_path):
    tied = True  # the harder case: the head's rows are the embedding's, saved once
    ours, theirs = pair(tied)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    expected = ours(input_ids=IDS).logits
    peft_loaded = peft.PeftModel.from_pretrained(llama(tied), tmp_path / "ours").eval()
    ours_loaded = PeftModel.from_pretrained(llama(tied), tmp_path / "theirs").eval()
    # oracle: the saving model's logits; values round trip exactly in fp32, orders of matmuls differ
    torch.testing.assert_close(peft_loaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flag", [True, False])
def test_dtype_matrix_rows_follow_the_adapter_rule(dtype, flag):
    ours, theirs = pair(True, dtype, autocast_adapter_dtype=flag)
    rows = _rows(ours)[0][1]
    assert rows.dtype == (torch.float32 if flag else dtype)
    assert ours.base_model.model.model.embed_tokens.token_adapter.base_layer.weight.dtype == dtype
    # oracle: PEFT's logits in the same dtype; the rows hold values exactly representable in `dtype`
    # after PEFT's own cast, so the only difference is the order of operations in half precision
    with torch.no_grad():
        for (_, mine), (_, their) in zip(_rows(ours), _rows(theirs), strict=True):
            mine.copy_(mine.to(dtype))
            their.copy_(mine)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours(input_ids=IDS).logits.float(), theirs(input_ids=IDS).logits.float(),
                               rtol=tol, atol=tol)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = ours(input_ids=IDS).logits.float()
        if dtype == torch.float16:  # PEFT's index_copy of an fp16 table fails under CPU bf16 autocast
            with pytest.raises(RuntimeError, match="autocast"):
                theirs(input_ids=IDS)
            return
        other = theirs(input_ids=IDS).logits.float()
    torch.testing.assert_close(mine, other, rtol=5e-2, atol=5e-2)  # autocast: bf16 matmuls on both sides


def test_merge_writes_rounded_rows_and_unmerge_restores_bits():
    ours, _ = pair(True, torch.bfloat16)
    embedding = ours.base_model.model.model.embed_tokens.token_adapter.base_layer
    before = embedding.weight.detach().clone()
    rows = _rows(ours)[0][1]
    expected = ours(input_ids=IDS).logits
    ours.merge_adapter()
    assert torch.equal(embedding.weight[TOKENS], rows.detach().to(torch.bfloat16))  # rounded once
    others = [i for i in range(before.shape[0]) if i not in TOKENS]
    assert torch.equal(embedding.weight[others], before[others])
    # oracle: the unmerged forward, which rounds the same rows to bf16 on the fly: identical values
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=0)
    ours.unmerge_adapter()
    assert torch.equal(embedding.weight, before)
    plain = ours.merge_and_unload()
    assert type(plain.model.embed_tokens).__name__ == "Embedding" and type(plain.lm_head).__name__ == "Linear"
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_a_training_step_changes_only_the_chosen_rows(tied):
    ours, theirs = pair(tied, torch.bfloat16)
    for model in (ours, theirs):
        model.train()
        rows = _rows(model)[0][1]
        start = rows.detach().clone()
        embedding = model.base_model.model.model.embed_tokens.token_adapter.base_layer.weight.detach().clone()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(input_ids=IDS, labels=IDS).loss.backward()
        assert rows.grad is not None and rows.grad.abs().sum() > 0
        optimizer.step()
        assert not torch.equal(rows, start)
        assert torch.equal(model.base_model.model.model.embed_tokens.token_adapter.base_layer.weight, embedding)
    # oracle: PEFT's rows after the same step (fp32 rows on both sides, bf16 base: the gradients differ
    # by bf16 rounding in the forward, so the comparison is at bf16 resolution)
    torch.testing.assert_close(_rows(ours)[0][1], _rows(theirs)[0][1], rtol=2e-2, atol=2e-2)


def test_dict_form_and_clear_errors():
    model = get_peft_model(llama(False), LoraConfig(target_modules=["q_proj"],
                                                    trainable_token_indices={"embed_tokens": [1, 2]}))
    assert _rows(model)[0][1].shape == (2, 64)
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(trainable_token_indices=[1, "x"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        get_peft_model(llama(False), LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                trainable_token_indices={"embed_tokens": [1]}))
    with pytest.raises(ConfigError, match="nn.Embedding"):
        get_peft_model(llama(False), LoraConfig(target_modules=["q_proj"], trainable_token_indices={"nope": [1]}))
    with pytest.raises(ValueError, match="outside"):
        get_peft_model(llama(False), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[500]))


def test_per_sample_adapters_in_one_batch():
    model = get_peft_model(llama(True), LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[9, 11]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens" in name:
                param.add_(1.0)
    model.eval()
    mixed = model(input_ids=IDS, adapter_names=["default", "other"]).logits
    model.set_adapter("other")
    other = model(input_ids=IDS).logits
    model.set_adapter("default")
    # oracle: each adapter alone on the whole batch (fp32; the same values, other summation order)
    torch.testing.assert_close(mixed[0], model(input_ids=IDS).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], other[1], rtol=1e-5, atol=1e-5)
