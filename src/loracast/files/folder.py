"""An adapter folder as one unit: its two files written together and read as a matching pair.

PEFT's layout has two files, `adapter_model.safetensors` and `adapter_config.json`, and no file
system renames two files at once. So a save (1) validates and serialises the config before
touching the folder, (2) writes both files in full to temporary names and (3) renames the
weights, then the config, into place, under an exclusive lock on the folder; the safetensors
metadata records a digest of the config (`loracast.config_sha256`, ignored by PEFT). A reader
holds a shared lock and checks the digest: a process killed between the two renames, or a
writer that took no lock, leaves a pair that is refused with an error saying so, never loaded
as a silent mix of two adapters. Temporary files of an interrupted save are removed by the next
save into the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from loracast._atomic import folder_lock, publish_together, remove_stale_temps, write_safetensors, write_text
from loracast.config import CONFIG_NAME, LoraConfig
from loracast.errors import AdapterLoadError, ConfigError
from loracast.files.format import WEIGHTS_NAME, read_adapter_weights

CONFIG_DIGEST_KEY = "loracast.config_sha256"
# Fields that say where an adapter came from or how to open it, not what it computes: the digest
# leaves them out, so editing them by hand (a moved base model path) does not break the pair.
_INFORMATIONAL_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


def config_digest(data: dict[str, Any]) -> str:
    """SHA-256 of a config dict (as in `adapter_config.json`) without its informational fields."""
    kept = {key: value for key, value in data.items() if key not in _INFORMATIONAL_FIELDS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_adapter_folder(folder: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                         config: LoraConfig) -> None:
    """Save one adapter's weights and config into `folder` as a bound pair (see the module docstring).

    Raises:
        ConfigError: the config is invalid or cannot be written as JSON; nothing was written.
        OSError: a file could not be written (disk full...); the earlier adapter is unchanged.
    """
    text = config.to_json_string()  # validates and serialises before anything is written
    metadata = {**metadata, CONFIG_DIGEST_KEY: config_digest(json.loads(text))}
    os.makedirs(folder, exist_ok=True)
    weights_path, config_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, CONFIG_NAME)
    with folder_lock(folder):
        remove_stale_temps(folder, (WEIGHTS_NAME, CONFIG_NAME))
        # the weights first: they carry the digest, so a kill between the renames leaves new
        # weights beside an old config, which the digest exposes (the reverse order would not
        # be caught when the old weights were written by PEFT, without a digest)
        publish_together([(weights_path, lambda tmp: write_safetensors(tmp, tensors, metadata)),
                          (config_path, lambda tmp: write_text(tmp, text))])


@dataclass
class AdapterFolder:
    """What one adapter folder holds, read as a consistent pair.

    Attributes:
        path: the folder.
        config: its config (or the one the caller passed instead).
        tensors: file key -> CPU tensor.
        metadata: the safetensors header metadata ({} for a pickle file).
    """

    path: str
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_adapter_folder(folder: str | os.PathLike, allow_pickle: bool = False,
                        config: LoraConfig | None = None) -> AdapterFolder:
    """Read an adapter folder written by loracast or PEFT.

    With `config` given, the folder's own `adapter_config.json` is neither read nor compared
    with the weights (the caller chose the config).

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ConfigError: the config is malformed (file and field named).
        AdapterLoadError: the weights are unreadable, or the two files come from different saves.
    """
    path = os.fspath(folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"adapter folder {path!r} does not exist; loracast loads adapters from local folders "
            f"(holding {CONFIG_NAME} and {WEIGHTS_NAME}). For a Hub repo, download it first with "
            "huggingface_hub.snapshot_download")
    config_path = os.path.join(path, CONFIG_NAME)
    with folder_lock(path, shared=True):  # a loracast save in progress finishes first
        raw = None if config is not None else _read_config_bytes(config_path)
        tensors, metadata = read_adapter_weights(path, allow_pickle=allow_pickle)
    if config is None:
        config = LoraConfig.from_json(raw, source=config_path)
        _check_same_save(path, config_path, raw, metadata)
    return AdapterFolder(path, config, tensors, metadata)


def _read_config_bytes(config_path: str) -> bytes:
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} at {os.path.dirname(config_path)!r}: pass the folder written by save_pretrained "
            "(loracast or PEFT)")
    try:
        with open(config_path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError("<file>", config_path, f"a readable file ({exc.strerror})", source=config_path) from None


def _check_same_save(folder: str, config_path: str, raw: bytes, metadata: dict[str, str]) -> None:
    recorded = metadata.get(CONFIG_DIGEST_KEY)
    if recorded is None:  # written by PEFT or an older loracast: nothing binds the pair
        return
    found = config_digest(json.loads(raw))
    if found != recorded:
        raise AdapterLoadError(
            f"{os.path.join(folder, WEIGHTS_NAME)} and {config_path} come from different saves: the weights were "
            "saved with another config (its digest differs). A save into this folder was interrupted, another "
            "program wrote one of the files, or adapter_config.json was edited by hand. Save the adapter again; "
            "to use these weights with this config anyway, pass config=LoraConfig.from_pretrained(folder) "
            "to PeftModel.from_pretrained")
