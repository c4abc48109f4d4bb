"""Per-sample `adapter_names` in `generate` with beam search and `num_return_sequences`.

transformers repeats each input sample max(num_beams, num_return_sequences) times before decoding;
each adapter name then covers every row made from its sample, as in PEFT. Oracles: each sample
generated alone with its adapter active (or adapters disabled), and PEFT 0.21.2 generating the
same batch with the same adapter values; tolerance: equal token ids.
"""

from __future__ import annotations

import peft
import pytest
import torch

import loracast
from tests.support.models import copy_params, randomize_adapters

PROMPTS = torch.tensor([[5, 17, 42, 9], [3, 3, 60, 71], [11, 88, 2, 40]])
NAMES = ["default", "other", "__base__"]


def two_adapters(library, base):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    model = library.get_peft_model(base, library.LoraConfig(**config))
    model.add_adapter("other", library.LoraConfig(**config))
    return model


@pytest.fixture
def models(make_llama):
    ours = two_adapters(loracast, make_llama())
    randomize_adapters(ours, scale=0.3)
    theirs = two_adapters(peft, make_llama())
    copy_params(ours, theirs)
    return ours.eval(), theirs.eval()


def generate(model, prompts, **kwargs):
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    options.update(kwargs)
    with torch.no_grad():
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)


def test_beam_search_with_adapter_names_equals_each_sample_alone_and_peft(models):
    ours, theirs = models
    options = dict(num_beams=3, num_return_sequences=2)
    mixed = generate(ours, PROMPTS, adapter_names=NAMES, **options)
    rows = options.get("num_return_sequences", 1)
    assert mixed.shape[0] == len(NAMES) * rows
    alone = []
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with ours.disable_adapter():
                alone.append(generate(ours, PROMPTS[i:i + 1], **options))
        else:
            ours.set_adapter(name)
            alone.append(generate(ours, PROMPTS[i:i + 1], **options))
    ours.set_adapter("default")
    assert torch.equal(mixed, torch.cat(alone))
    assert len({tuple(row.tolist()) for row in mixed[::rows]}) == 3  # the adapters really differ
    assert torch.equal(mixed, generate(theirs, PROMPTS, adapter_names=NAMES, **options))


def test_num_return_sequences_without_beams_repeats_names(models):
    ours, _ = models
    torch.manual_seed(0)
    mixed = generate(ours, PROMPTS, adapter_names=NAMES, num_return_sequences=2, do_sample=True, top_k=1)
    ours.set_adapter("other")
    torch.manual_seed(0)
    alone = generate(ours, PROMPTS[1:2], num_return_sequences=2, do_sample=True, top_k=1)  # top_k=1: greedy
    assert torch.equal(mixed[2:4], alone)


def test_wrong_number_of_names_in_generate_is_refused(models):
    ours, _ = models
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries \(or 4 after generate's x2 expansion\) but "
                                         r"the batch has 6 samples"):
        generate(ours, PROMPTS, adapter_names=NAMES[:2], num_beams=2)
