"""The distributed helpers that need no process group: block detection, FSDP unit checks, the
FSDP1 wrap policy, mixed-precision settings, rank shares, and saving through wrappers.

Oracle for the FSDP1 predictions: what torch raised on a 2-process run
(tests/distributed/test_multiprocess.py and ../shared/reference/ecosystem.md section 1).
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.distributed import (
    FSDPSetupError,
    check_fsdp1,
    explain_flatten_errors,
    fsdp1_auto_wrap_policy,
    fsdp1_flatten_problems,
    fsdp2_shard_problems,
    global_mean_weight,
    init_distributed,
    mixed_precision_policy,
    rank_share,
    save_adapter,
    shard_model,
    transformer_block_classes,
    unwrap_peft_model,
    wrap_ddp,
)
from loracast.distributed.runtime import choose_backend
from loracast.distributed.units import unit_parameters
from tests.support.models import tiny_llama_config

QV = dict(target_modules=["q_proj", "v_proj"])


def naive_policy():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})


# -- blocks and units --------------------------------------------------------------------------

def test_block_classes_come_from_no_split_modules_or_the_caller(make_llama):
    model = get_peft_model(make_llama(), LoraConfig(**QV))
    assert transformer_block_classes(model) == (LlamaDecoderLayer,)
    assert transformer_block_classes(model, ["LlamaDecoderLayer"]) == (LlamaDecoderLayer,)
    assert transformer_block_classes(model, [LlamaDecoderLayer]) == (LlamaDecoderLayer,)
    with pytest.raises(ValueError, match=r"\['GPT2Block'\] are not modules of PeftModel.*LlamaDecoderLayer"):
        transformer_block_classes(model, ["GPT2Block"])
    with pytest.raises(ValueError, match=r"pass block_classes=\[YourBlock\]"):
        transformer_block_classes(nn.Sequential(nn.Linear(2, 2)))


def test_unit_parameters_partition_the_model_once(make_llama):
    model = make_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: must be counted once
    blocks = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    units = unit_parameters(model, blocks)
    assert sorted(units) == ["", "model.layers.0", "model.layers.1"]
    names = [n for params in units.values() for n, _ in params]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert all(n.startswith("model.layers.0.") for n, _ in units["model.layers.0"])


# -- FSDP1 ------------------------------------------------------------------------------------

def test_naive_fsdp1_wrap_is_predicted_to_fail_and_the_policy_is_clean(make_llama):
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV))  # fp32 adapters on bf16
    naive = fsdp1_flatten_problems(model, naive_policy())
    assert [(p.unit, p.kind) for p in naive] == [("base_model.model.model.layers.0", "mixed-dtype"),
                                                 ("base_model.model.model.layers.1", "mixed-dtype")]
    assert "torch.float32, trainable" in naive[0].groups and "torch.bfloat16, frozen" in naive[0].groups
    assert fsdp1_flatten_problems(model) != []  # no policy: one root unit holding everything
    policy = fsdp1_auto_wrap_policy(model)
    for use_orig_params in (False, True):
        assert fsdp1_flatten_problems(model, policy, use_orig_params=use_orig_params) == []
    # the policy puts each LoRA factor in a unit of its own, and nothing else
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert policy(module=lora_a, recurse=False, nonwrapped_numel=0)
    assert not policy(module=model.base_model.model.model.norm, recurse=False, nonwrapped_numel=0)


def test_uniform_bf16_fails_only_without_orig_params_as_torch_does(make_llama):
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV), precision="fsdp")
    kinds = {p.kind for p in fsdp1_flatten_problems(model, naive_policy(), use_orig_params=False)}
    assert kinds == {"mixed-requires-grad"}
    assert fsdp1_flatten_problems(model, naive_policy(), use_orig_params=True) == []
    assert fsdp1_flatten_problems(model, fsdp1_auto_wrap_policy(model), use_orig_params=False) == []


def test_check_fsdp1_names_the_units_and_the_fix(make_llama):
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV))
    with pytest.raises(FSDPSetupError) as info:
        check_fsdp1(model, naive_policy())
    text = str(info.value)
    assert "unit 'base_model.model.model.layers.0' holds parameters of several dtypes" in text
    assert "q_proj.lora_A.default.weight" in text
    assert "fsdp1_auto_wrap_policy(model)" in text and 'precision="fsdp"' in text
    check_fsdp1(model, fsdp1_auto_wrap_policy(model))  # no error


def test_explain_flatten_errors_points_to_the_policy_and_keeps_the_cause():
    torch_error = ValueError("Must flatten tensors with uniform dtype but got torch.bfloat16 and torch.float32")
    with pytest.raises(FSDPSetupError, match=r"fsdp1_auto_wrap_policy\(model\)") as info:
        with explain_flatten_errors():
            raise torch_error
    assert info.value.__cause__ is torch_error
    with pytest.raises(FSDPSetupError, match="bnb_4bit_quant_storage"):
        with explain_flatten_errors():
            raise ValueError("Cannot flatten integer dtype tensors")
    with pytest.raises(ValueError, match="^unrelated$"):  # other errors pass unchanged
        with explain_flatten_errors():
            raise ValueError("unrelated")


def test_integer_stored_4bit_weights_are_reported_and_float_storage_is_not():
    import bitsandbytes as bnb

    def quantized(storage: torch.dtype) -> nn.Module:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_storage=storage)
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False,
                                         quant_storage=storage)
        frozen = nn.Sequential(layer.to("cpu"), nn.LayerNorm(64, dtype=torch.bfloat16))  # .to quantizes
        return frozen.requires_grad_(False)

    packed = quantized(torch.uint8)
    assert packed[0].weight.dtype == torch.uint8
    problems = fsdp1_flatten_problems(packed)
    assert [p.kind for p in problems] == ["integer-storage"] and "bnb_4bit_quant_storage" in problems[0].fix
    assert fsdp2_shard_problems(packed, []) == []  # FSDP2 shards each tensor alone: integers are fine
    as_bf16 = quantized(torch.bfloat16)
    assert as_bf16[0].weight.dtype == torch.bfloat16
    assert fsdp1_flatten_problems(as_bf16) == []


# -- FSDP2 ------------------------------------------------------------------------------------

def test_mixed_precision_follows_the_model_dtypes(make_llama):
    stable = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV))
    policy = mixed_precision_policy(stable)
    assert (policy.param_dtype, policy.reduce_dtype) == (None, None)  # as stored: bf16 base, fp32 adapters
    policy = mixed_precision_policy(stable, compute_dtype=torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    uniform = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV), autocast_adapter_dtype=False)
    assert mixed_precision_policy(uniform).reduce_dtype == torch.float32  # bf16 grads summed in fp32
    with pytest.raises(ValueError, match="no trainable parameter"):
        mixed_precision_policy(make_llama().requires_grad_(False))


def test_fsdp2_rejects_trainable_dtypes_mixed_in_a_unit(make_llama):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(tiny_llama_config(attention_bias=True)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(bias="all", **QV))  # bf16 biases train next to fp32 adapters
    blocks = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    problems = fsdp2_shard_problems(model, blocks)
    assert {p.kind for p in problems} == {"mixed-trainable-dtype"}
    assert "torch.bfloat16, trainable" in problems[0].groups and "bias='none'" in problems[0].fix
    clean = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV))
    assert fsdp2_shard_problems(clean, [m for m in clean.modules() if isinstance(m, LlamaDecoderLayer)]) == []


def test_shard_model_needs_a_process_group(make_llama):
    model = get_peft_model(make_llama(), LoraConfig(**QV))
    with pytest.raises(RuntimeError, match="init_distributed"):
        shard_model(model)


# -- runtime ----------------------------------------------------------------------------------

def test_rank_shares_partition_a_batch_and_weights_restore_the_global_mean():
    items = list(range(7))
    shares = [rank_share(items, r, 3) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    # DDP averages over ranks: sum_r (n_r * w / N) * mean_r / w == the mean over all N
    losses = torch.arange(7.0)
    averaged = sum(global_mean_weight(len(s), 7, 3) * losses[s].mean() for s in shares) / 3
    assert float(averaged) == pytest.approx(float(losses.mean()))
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        rank_share(items, 3, 3)


def test_without_a_launcher_a_single_process_context_is_returned(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (0, 1, None, True, False)
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, ctx) is model
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed()
    assert choose_backend(torch.device("cpu")) == "gloo"


# -- saving -----------------------------------------------------------------------------------

def test_save_adapter_in_one_process_equals_save_pretrained(make_llama, tmp_path):
    model = get_peft_model(make_llama(), LoraConfig(init_lora_weights=False, **QV))
    save_adapter(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert unwrap_peft_model(model) is model
    with pytest.raises(TypeError, match="holds no loracast PeftModel"):
        save_adapter(nn.Linear(2, 2), tmp_path / "c")


def test_activation_checkpoint_wrappers_do_not_change_file_keys(make_llama, tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = get_peft_model(make_llama(), LoraConfig(init_lora_weights=False, **QV))
    plain_keys = set(model.adapter_state_dict())
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    assert set(model.adapter_state_dict()) == plain_keys
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_llama(), tmp_path)  # loads into the unwrapped layout
    assert set(reloaded.adapter_state_dict()) == plain_keys


def test_quantized_layers_are_unpacked_and_stop_repacking_before_sharding():
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from loracast.distributed import prepare_quantized_for_sharding

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False,
                                     quant_storage=torch.bfloat16)
    model = nn.Sequential(layer.to("cpu")).requires_grad_(False)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    packed_shape = tuple(layer.weight.shape)
    reference = model.train()(x)
    model.eval()(x)  # bitsandbytes repacks in place here on AVX512-BF16 CPUs
    if has_avx512bf16():
        assert layer.weight.quant_state.packing_format_for_cpu
    assert prepare_quantized_for_sharding(model) == 1
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert tuple(layer.weight.shape) == packed_shape and layer.weight.dtype == torch.bfloat16
    first, second = model.eval()(x), model(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # no longer repacks
    assert torch.equal(first, second) and torch.equal(model.train()(x), first)
    # bitsandbytes' own unpacking re-quantizes the double-quantized scales: a bf16 rounding or two
    torch.testing.assert_close(first, reference, rtol=2 ** -6, atol=2 ** -6 * float(reference.abs().max()))
    assert prepare_quantized_for_sharding(nn.Linear(2, 2)) == 0


def test_accelerates_fsdp1_setup_is_read_from_its_variables(make_llama):
    from loracast.distributed import accelerate_fsdp1_setup

    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**QV))
    default = accelerate_fsdp1_setup(model, {})
    assert (default.policy, default.use_orig_params) == (None, False)  # accelerate: NO_WRAP, use_orig_params=False
    blocks = accelerate_fsdp1_setup(model, {"FSDP_AUTO_WRAP_POLICY": "transformer_based_wrap",
                                            "FSDP_USE_ORIG_PARAMS": "true"})
    assert blocks.use_orig_params and blocks.policy.block_classes == (LlamaDecoderLayer,)
    size = accelerate_fsdp1_setup(model, {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_MIN_NUM_PARAMS": "1000"})
    # every unit the size policy makes (>= 1000 elements) mixes fp32 adapters with the bf16 base
    assert {p.kind for p in fsdp1_flatten_problems(model, size.policy)} == {"mixed-dtype"}
    assert accelerate_fsdp1_setup(model, {"FSDP_VERSION": "2"}) is None
    with pytest.raises(ValueError, match="GPT2Block"):
        accelerate_fsdp1_setup(model, {"FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPT2Block"})
