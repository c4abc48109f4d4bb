"""Whole-adapter atomic saves: SIGKILL at random moments, two writers at once, a config that
cannot be serialised, a full disk, and temp files left by a crash.

Oracle: each adapter's own outputs (fp32, atol 1e-6): after any fault the folder loads as the
complete old or new adapter, or is refused with a LoracastError, never as a silent mix.
The fault harness (tests/support/fault_injection.py) also measures PEFT in benchmarks/save_faults.py.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import signal
import tempfile

import pytest
import torch
from safetensors import safe_open

from loracast import AdapterLoadError, ConfigError, LoraConfig, PeftModel
from tests.support.fault_injection import classify, concurrent_rounds, kill_trials, shared_pair, temp_files

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks a child process (POSIX)")


@pytest.fixture(scope="module")
def pair():
    return shared_pair("loracast")


@pytest.fixture
def folder(tmp_path):
    # A SIGKILL loses no page cache, so a RAM folder tests the same thing without the cost of
    # fsync on a busy disk (about 9 ms a file on the CI machine); elsewhere the test's own folder.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    path = tempfile.mkdtemp(prefix="loracast-faults-", dir=base)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def folder_bytes(path: str) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.mark.multiprocess  # 30 forked writers, each killed
def test_sigkill_at_random_moments_never_leaves_a_silent_mix(pair, folder):
    counts = kill_trials(pair, folder, trials=30, seed=0)
    assert counts.outcomes["mix"] == 0 and counts.outcomes["error"] == 0, counts.as_dict()
    assert counts.outcomes["new"] > 0 and counts.outcomes["old"] > 0, counts.as_dict()  # kills hit saves
    assert counts.temps_after_next_save == 0, counts.as_dict()


@pytest.mark.multiprocess  # forked writers racing each other
def test_two_writers_at_once_are_serialised(pair, folder):
    counts = concurrent_rounds(pair, folder, rounds=20)
    assert counts.outcomes["mix"] == 0 and counts.outcomes["error"] == 0, counts.as_dict()
    assert counts.outcomes["refused"] == 0, counts.as_dict()  # the folder lock orders them: always complete
    assert counts.temps_after_fault == 0


def test_weights_and_config_of_different_saves_are_refused_by_name(pair, tmp_path):
    # the state a kill between the two renames leaves: new weights beside the old config
    old, new = tmp_path / "old", tmp_path / "new"
    pair.old.save_pretrained(old)
    pair.new.save_pretrained(new)
    shutil.copy(new / "adapter_model.safetensors", old / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="come from different saves") as caught:
        PeftModel.from_pretrained(copy.deepcopy(pair.base), old)
    assert "adapter_config.json" in str(caught.value) and "Save the adapter again" in str(caught.value)
    # the documented way to use the weights anyway: the caller chooses the config
    config = LoraConfig.from_pretrained(old)
    PeftModel.from_pretrained(copy.deepcopy(pair.base), old, config=config)


def test_hand_edited_informational_fields_keep_the_pair_valid(pair, tmp_path):
    pair.old.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = "/models/moved-elsewhere"
    path.write_text(json.dumps(data, indent=4))  # reformatted too
    assert classify(pair, str(tmp_path)) == "old"


@pytest.mark.parametrize("spoil", ["numpy_int", "nan_alpha", "unserialisable_extra"])
def test_config_that_cannot_be_written_leaves_the_folder_untouched(pair, tmp_path, spoil):
    numpy = pytest.importorskip("numpy")
    pair.old.save_pretrained(tmp_path)
    before = folder_bytes(str(tmp_path))
    intact = pair.new.peft_config["default"]
    config = pair.new.peft_config["default"] = copy.deepcopy(intact)
    if spoil == "numpy_int":  # the example: accepted by PEFT, then fails mid-save
        config.qalora_group_size = numpy.int64(16)
    elif spoil == "nan_alpha":
        config.lora_alpha = float("nan")
    else:
        config.extra_fields["note"] = {1, 2}
    try:
        with pytest.raises(ConfigError):
            pair.new.save_pretrained(tmp_path)
    finally:
        pair.new.peft_config["default"] = intact
    assert folder_bytes(str(tmp_path)) == before  # nothing published, no temp file left
    assert classify(pair, str(tmp_path)) == "old"


def _save_with_file_size_limit(pair, folder: str, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        pair.new.save_pretrained(folder)
    except OSError:
        os._exit(3)
    os._exit(0)


def test_disk_full_while_writing_keeps_the_old_adapter(pair, folder):
    pair.old.save_pretrained(folder)
    before = folder_bytes(folder)
    pid = os.fork()
    if pid == 0:
        _save_with_file_size_limit(pair, folder, limit=4096)  # the config fits, the weights do not
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3  # the save raised OSError
    assert folder_bytes(folder) == before
    assert classify(pair, folder) == "old"


def test_next_save_removes_temp_files_of_a_crashed_one(pair, tmp_path):
    pair.old.save_pretrained(tmp_path)
    leftovers = [".adapter_model.safetensors.k2j3h4.tmp", ".adapter_config.json.x9y8.tmp"]
    for name in [*leftovers, ".other.tmp"]:
        (tmp_path / name).write_bytes(b"partial")
    pair.new.save_pretrained(tmp_path)
    assert temp_files(str(tmp_path)) == [".other.tmp"]  # only the adapter's own temp files are taken
    assert classify(pair, str(tmp_path)) == "new"


def test_saved_weights_record_the_config_digest_and_peft_still_loads(pair, tmp_path):
    from peft import PeftModel as PeftPeftModel

    pair.new.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        assert len(handle.metadata()["loracast.config_sha256"]) == 64
    peft_model = PeftPeftModel.from_pretrained(copy.deepcopy(pair.base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(pair.ids).logits, pair.outputs["new"], atol=1e-6, rtol=0)
