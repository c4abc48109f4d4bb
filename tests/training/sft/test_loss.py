"""The SFT loss that projects only labelled positions (training/sft/loss.py) against transformers'
causal-LM loss: same value, same adapter gradients, on plain and LoRA models; and the fallback to
the model's own loss where logits are not head(decoder(x))."""

from __future__ import annotations

import pytest
import torch

from loracast import LoraConfig, get_peft_model
from loracast.training.sft.loss import AssistantLoss
from tests.support.models import tiny_llama_config


def _batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # a right-padded row
    mask[2, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 12:] = ids[0, 12:]  # assistant spans at different places in each row
    labels[1, 6:14] = ids[1, 6:14]
    labels[2, 5:9] = ids[2, 5:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _llama(dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_loss_and_adapter_gradients_equal_transformers(dtype):
    batch = _batch()
    grads = []
    losses = []
    for split in (False, True):
        model = get_peft_model(_llama(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights="gaussian"))
        model.train()
        loss = AssistantLoss(model)(batch) if split else model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    assert losses[1].dtype == losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], rtol=tolerance, atol=tolerance)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=tolerance, atol=tolerance * 1e-2, msg=name)


def test_split_path_used_after_first_batch_check():
    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules="all-linear"))
    loss_of = AssistantLoss(model)
    assert loss_of.split is None
    loss_of(_batch())
    assert loss_of.split is True


def test_soft_capped_logits_keep_the_split_path_and_equal_the_model_loss():
    # Gemma-2 soft-caps its logits after the head: an element-wise step, which the head's shorter
    # output (labelled positions only) goes through unchanged
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=1.0,
                          tie_word_embeddings=False)
    base = Gemma2ForCausalLM(config)
    with torch.no_grad():
        base.lm_head.weight.mul_(20)  # logits of a few units, which the cap at 1.0 squashes
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    batch = _batch()
    loss_of = AssistantLoss(model)
    loss = loss_of(batch)
    assert loss_of.split is True
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_a_model_that_needs_every_positions_logits_falls_back_to_selecting_after_the_head():
    # a model that reshapes its logits to (batch, sequence, vocabulary) after the head cannot take the
    # labelled positions alone: the first-batch check fails and the logits are selected after the head
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Reshaping(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            logits = out.logits.reshape(input_ids.shape[0], input_ids.shape[1], -1)
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    torch.manual_seed(0)
    model = get_peft_model(Reshaping(tiny_llama_config()), LoraConfig(r=4, target_modules="all-linear"))
    batch = _batch()
    loss_of = AssistantLoss(model)
    loss = loss_of(batch)
    assert loss_of.split is False
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_dropout_in_training_mode_does_not_fail_the_check():
    model = get_peft_model(_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear",
                                                init_lora_weights="gaussian"))
    model.train()
    loss_of = AssistantLoss(model)
    loss_of(_batch())
    assert loss_of.split is True and model.training


def test_batch_without_labels_uses_the_model_loss():
    model = _llama()
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss_of = AssistantLoss(model)
    assert torch.isnan(loss_of(batch))  # transformers' mean over no tokens
    assert loss_of.split is None


def test_generation_feeds_the_head_contiguous_hidden_states_and_removes_its_hook():
    # torch's CPU linear with a frozen bf16 weight is pathologically slow on the strided last-position
    # view that generation passes the head (sft.evaluate.contiguous_head_input); the hook hands it a copy
    from loracast.training.sft.evaluate import contiguous_head_input

    model = get_peft_model(_llama(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    head = model.get_base_model().lm_head
    seen = []

    def observe(module, args):
        seen.append(args[0].is_contiguous())

    ids = torch.randint(3, 128, (2, 9))
    with contiguous_head_input(model):
        observer = head.register_forward_pre_hook(observe)  # runs after the context's own hook
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        observer.remove()
    inside = list(seen)
    seen.clear()
    observer = head.register_forward_pre_hook(observe)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    observer.remove()
    assert inside and all(inside)
    assert seen[0] is False  # without it, the prefill hands the head a strided view
    assert not head._forward_pre_hooks


def test_attention_choice_eager_on_cpu_transformers_default_elsewhere():
    from loracast.training.sft.model import attention_for

    assert attention_for(torch.device("cpu")) == "eager"
    assert attention_for(torch.device("cuda")) is None
    assert attention_for(torch.device("cpu"), "sdpa") == "sdpa"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_cross_entropy_has_the_whole_tensor_gradients_and_keeps_only_the_logits(dtype):
    import torch.nn.functional as F

    from loracast.training.sft.loss import SummedCrossEntropy, _row_chunks

    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(100, 49_152, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, 49_152, (100,), generator=generator)
    assert len(_row_chunks(logits)) == 3  # several chunks, the last one short
    whole, chunked = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = F.cross_entropy(whole.float(), targets, reduction="sum")
    expected.backward(torch.tensor(0.37))
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = SummedCrossEntropy.apply(chunked, targets)
    loss.backward(torch.tensor(0.37))
    assert chunked.grad.dtype == dtype and torch.equal(chunked.grad, whole.grad)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)  # the chunks' sums add up in another order
    assert {t.untyped_storage().data_ptr() for t in kept} == {chunked.untyped_storage().data_ptr(),
                                                              targets.untyped_storage().data_ptr()}
