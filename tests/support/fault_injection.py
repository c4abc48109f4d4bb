"""Fault injection for adapter saves, for loracast and PEFT alike (the tests and
`benchmarks/save_faults.py` share it): a forked child saves in a loop and is SIGKILLed at a random
moment, or two children save into one folder at once; then the folder is loaded and classified.

Two adapters, "old" and "new", have the same shapes but different `lora_alpha` and weights, so a
mix of one's weights with the other's config loads without a shape error and gives outputs that
match neither: a silent mix. Outcomes: "old", "new" (outputs equal to one adapter's, atol 1e-6),
"refused" (loading raised; for loracast it must be a LoracastError), "mix" (loaded, matching
neither), "error" (loracast raised something else).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

TARGETS = ["q_proj", "v_proj"]
KNOWN_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}


# adapter_config.json entries the issue measured raising a foreign exception or being wrongly
# accepted, with the field the error must name
MALFORMED_CONFIGS = [
    (dict(target_modules="q_proj("), "target_modules"),
    (dict(exclude_modules="[v"), "exclude_modules"),
    (dict(modules_to_save=["lm_head("]), "modules_to_save"),
    (dict(rank_pattern={"q_proj(": 4}), "rank_pattern"),
    (dict(alpha_pattern={"*q": 4}), "alpha_pattern"),
    (dict(layers_pattern="layers(", layers_to_transform=[0]), "layers_pattern"),
    (dict(lora_alpha=10**400), "lora_alpha"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_alpha=float("inf")), "lora_alpha"),
    (dict(alpha_pattern={"q_proj": float("-inf")}), "alpha_pattern['q_proj']"),
    (dict(r=2**31), "r"),
    (dict(r=10**30), "r"),
    (dict(rank_pattern={"q_proj": 2**40}), "rank_pattern['q_proj']"),
    (dict(qalora_group_size=False), "qalora_group_size"),
    (dict(auto_mapping="x"), "auto_mapping"),
    (dict(megatron_core=3), "megatron_core"),
    (dict(init_lora_weights=1), "init_lora_weights"),
]

# fingerprint entries damaged as the issue measured (the load must warn and go on)
DAMAGED_FINGERPRINTS = {
    "environment": 5,
    "base_layers": [["model.layers.0.self_attn.q_proj", "float32"], {}],
    "quantization": [[], {}],
    "adapter_dtypes": {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": "int8"},
    "precision": {"lora_compute": "warp-speed"},
}


def tiny_llama():
    """The tiny Llama both adapters are trained on (random weights, fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@dataclass
class Pair:
    """The two adapters a trial saves, their reference outputs and a base to load into."""

    library: str
    base: torch.nn.Module
    old: torch.nn.Module
    new: torch.nn.Module
    ids: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def make_pair(library: str) -> Pair:
    """Two trained-looking adapters of one tiny Llama, built with `library` ("loracast" or "peft")."""
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from loracast import LoraConfig, get_peft_model
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    pair = Pair(library, base, None, None, ids)  # type: ignore[arg-type]
    for role, alpha, seed in (("old", 8, 1), ("new", 32, 2)):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        setattr(pair, role, model.eval())
        with torch.no_grad():
            pair.outputs[role] = model(pair.ids).logits
    return pair


@functools.cache
def shared_pair(library: str) -> Pair:
    """One `make_pair(library)` for every test module (building it costs about a second); tests
    that change it put it back."""
    return make_pair(library)


def classify(pair: Pair, folder: str) -> str:
    """Load `folder` with the pair's library and say what it holds (see the module docstring)."""
    from loracast.errors import LoracastError

    base = copy.deepcopy(pair.base)  # from_pretrained adapts the model it is given
    try:
        if pair.library == "peft":
            from peft import PeftModel
        else:
            from loracast import PeftModel
        model = PeftModel.from_pretrained(base, folder).eval()
    except LoracastError:
        return "refused"
    except Exception:
        return "refused" if pair.library == "peft" else "error"
    with torch.no_grad():
        out = model(pair.ids).logits
    for role, expected in pair.outputs.items():
        if torch.allclose(out, expected, atol=1e-6, rtol=0):
            return role
    return "mix"


def temp_files(folder: str) -> list[str]:
    """Files in `folder` that a complete save does not write (leftovers of an interrupted one)."""
    return sorted(name for name in os.listdir(folder) if name not in KNOWN_FILES)


def _save_forever(pair: Pair, folder: str, ready_fd: int) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's thread pool
    pair.new.save_pretrained(folder)
    os.write(ready_fd, b"1")  # warmed up: from here on saves come one after another
    while True:
        pair.old.save_pretrained(folder)
        pair.new.save_pretrained(folder)


def _child(target, *args) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller (pytest) code
        code = 0
        try:
            target(*args)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


@dataclass
class Counts:
    """Outcomes of the trials, and temp files seen after the fault and after the next save."""

    outcomes: Counter = field(default_factory=Counter)
    temps_after_fault: int = 0
    temps_after_next_save: int = 0
    trials: int = 0

    def as_dict(self) -> dict:
        return {"trials": self.trials, "outcomes": dict(self.outcomes), "temps_after_fault": self.temps_after_fault,
                "temps_after_next_save": self.temps_after_next_save}


def save_seconds(pair: Pair, folder: str, repeats: int = 3) -> float:
    """The median time of one save of the pair's adapter into `folder`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pair.old.save_pretrained(folder)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def one_thread():
    """torch on one thread while the trials run: the models are tiny, and on a busy machine an
    idle thread pool costs more than the work (10 ms per matmul measured under load 13)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def kill_trials(pair: Pair, folder: str, trials: int, seed: int) -> Counts:
    """`trials` times: a child saves the new adapter, then old and new in turn, and is SIGKILLed
    after a random delay of up to two save times (so every moment of a save is hit)."""
    rng = random.Random(seed)
    counts = Counts(trials=trials)
    window = 2 * save_seconds(pair, folder)
    for _ in range(trials):
        pair.old.save_pretrained(folder)
        read_fd, write_fd = os.pipe()
        pid = _child(_save_forever, pair, folder, write_fd)
        os.read(read_fd, 1)
        time.sleep(rng.uniform(0.0, window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(write_fd)
        _record(counts, pair, folder)
    return counts


def _save_after(pair: Pair, role: str, folder: str, start_fd: int, times: int) -> None:
    torch.set_num_threads(1)
    os.read(start_fd, 1)  # both writers start together
    for _ in range(times):
        getattr(pair, role).save_pretrained(folder)


@one_thread()
def concurrent_rounds(pair: Pair, folder: str, rounds: int, saves_per_writer: int = 3) -> Counts:
    """Two children save the old and the new adapter into one folder at once, `rounds` times."""
    counts = Counts(trials=rounds)
    for _ in range(rounds):
        read_fd, write_fd = os.pipe()
        pids = [_child(_save_after, pair, role, folder, read_fd, saves_per_writer) for role in ("old", "new")]
        os.write(write_fd, b"go")
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(write_fd)
        _record(counts, pair, folder)
    return counts


def _record(counts: Counts, pair: Pair, folder: str) -> None:
    counts.outcomes[classify(pair, folder)] += 1
    counts.temps_after_fault += len(temp_files(folder))
    pair.old.save_pretrained(folder)  # the next save into the folder
    counts.temps_after_next_save += len(temp_files(folder))
    for name in temp_files(folder):  # start the next trial clean, whatever the library left
        os.remove(os.path.join(folder, name))
