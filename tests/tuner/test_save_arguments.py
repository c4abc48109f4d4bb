"""`save_pretrained` refuses PEFT arguments it does not implement instead of ignoring them."""

from __future__ import annotations

import peft
import pytest

from loracast import LoracastError, LoraConfig, UnsupportedArgumentError, get_peft_model
from tests.support.models import mixed_net


def _model():
    return get_peft_model(mixed_net(), LoraConfig(target_modules=["lin"]))


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"push_to_hub": True}, "push_to_hub=True"),
    ({"max_shard_size": "5GB"}, "max_shard_size='5GB'"),
    ({"save_embedding_layers": True}, "save_embedding_layers=True"),
    ({"state_dict": {}}, "state_dict={}"),
    ({"token": "hf_x"}, "token='hf_x'"),
])
def test_refused_with_nothing_written(tmp_path, kwargs, named):
    with pytest.raises(UnsupportedArgumentError, match=rf"save_pretrained\({named}\).*does not implement") as info:
        _model().save_pretrained(tmp_path / "out", **kwargs)
    assert isinstance(info.value, LoracastError) and isinstance(info.value, TypeError)
    assert not (tmp_path / "out").exists()


def test_harmless_values_accepted(tmp_path):
    """PEFT's defaults for its other arguments change nothing, so they pass; PEFT reads the result."""
    model = _model()
    model.save_pretrained(tmp_path / "out", save_embedding_layers="auto", push_to_hub=False,
                          path_initial_model_for_weight_conversion=None)
    model.save_pretrained(tmp_path / "out2", save_embedding_layers=False)
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "out")).target_modules == {"lin"}
    assert (tmp_path / "out2" / "adapter_model.safetensors").is_file()
