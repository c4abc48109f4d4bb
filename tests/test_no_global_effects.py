"""No hidden global effects: the garbage collector and other libraries' loggers are left alone,
and what loracast sets on a transformers model is documented where users look."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from torch import nn

from loracast import LoraConfig, get_peft_model


class ProbeLinear(nn.Linear):
    """An nn.Linear that records, each time injection reads its size, whether the collector runs."""

    seen: list[bool]

    @property
    def in_features(self) -> int:
        self.seen.append(gc.isenabled())
        return self._in_features

    @in_features.setter
    def in_features(self, value: int) -> None:
        self._in_features = value


def test_injection_leaves_the_garbage_collector_running():
    ProbeLinear.seen = []
    model = nn.Sequential(ProbeLinear(8, 8), nn.ReLU(), ProbeLinear(8, 4))
    assert gc.isenabled()
    get_peft_model(model, LoraConfig(target_modules=["0", "2"]))
    assert ProbeLinear.seen and all(ProbeLinear.seen)  # read during injection, the collector never paused


@pytest.fixture
def bnb_logger():
    logger = logging.getLogger("bitsandbytes")
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(logging.NOTSET)


def test_quiet_loading_restores_the_bitsandbytes_logger(bnb_logger):
    from loracast.integrations.hf_loading import quiet_transformers

    with quiet_transformers():
        assert bnb_logger.level == logging.ERROR  # its note about the optional 'kernels' package is hidden
    assert bnb_logger.level == logging.INFO


def test_4bit_set_up_restores_the_bitsandbytes_logger(bnb_logger):
    from loracast.training.common.model import quantization_config

    assert quantization_config(torch.bfloat16).load_in_4bit
    assert bnb_logger.level == logging.INFO


def test_get_peft_model_documents_what_it_sets_on_a_transformers_model():
    from loracast.integrations.transformers import INSTALLED_ATTRIBUTES

    doc = get_peft_model.__doc__
    assert [name for name in INSTALLED_ATTRIBUTES if f"``{name}``" not in doc] == []
