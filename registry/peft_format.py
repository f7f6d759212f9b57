"""Edits as PEFT LoRA adapter directories: the format PEFT, vLLM, SGLang and LoRAX all load.

One directory per edit, named ``edit-<id>-<first 12 hex of its adapter's sha256>``: the name never changes for
what it holds, so a serving engine's adapter cache can never serve a stale version under it, and exporting
again skips directories already there. Each holds

- ``adapter_config.json``: ``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``, ``lora_alpha``, the edited
  layers' full module names as ``target_modules``, no bias, no DoRA, no ``modules_to_save``;
- ``adapter_model.safetensors``: ``base_model.model.<layer>.lora_A.weight`` (r, in) and ``...lora_B.weight``
  (out, r) per edited layer, PEFT's own names and shapes.

``index.json`` maps each exported name to its edit (id, prompt, target, paraphrases) and ``keys.safetensors``
holds each name's routing keys, (n, dim) float32: what a router in front of an engine needs to pick the
adapter from the request's text. Only the edits exported this time are in the index; a rolled-back edit's
directory stays (immutable, harmless) but is no longer named.

Our delta is ``alpha / r * B A x``; PEFT's is ``lora_alpha / r * B A x``. vLLM reads ``lora_alpha`` as an
integer, so a fractional alpha is folded into B (scaled by alpha / r) and ``lora_alpha`` set to r.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from .types import Record, RegistryConfig, adapter_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INDEX_NAME = "index.json"
KEYS_NAME = "keys.safetensors"
PREFIX = "base_model.model."  # PEFT's saved names start at PeftModel.base_model.model: the wrapped model


def adapter_name(record: Record) -> str:
    return f"edit-{record.id}-{record.adapter_sha256[:12]}"


def peft_alpha(config: RegistryConfig) -> tuple[int, float]:
    """(lora_alpha, factor B is scaled by): alpha as is when it is a whole number, else r and alpha / r in B."""
    if float(config.alpha).is_integer():
        return int(config.alpha), 1.0
    return config.rank, config.alpha / config.rank


def adapter_config(config: RegistryConfig, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": peft_alpha(config)[0],
        "target_modules": [layer.name for layer in config.layers],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def peft_tensors(config: RegistryConfig, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter's tensors under PEFT's names (B scaled when alpha is folded into it)."""
    fold = peft_alpha(config)[1]
    out = {}
    for i, layer in enumerate(config.layers):
        a, b = adapter_names(i)
        out[f"{PREFIX}{layer.name}.lora_A.weight"] = adapter[a].float().contiguous()
        out[f"{PREFIX}{layer.name}.lora_B.weight"] = (adapter[b].float() * fold).contiguous()
    return out


def write(directory: str, config: RegistryConfig, records: list[Record], keys: dict[int, np.ndarray],
          adapters: dict[int, dict[str, torch.Tensor]], base_model: str) -> list[dict]:
    """Write (or keep, when already there) one adapter directory per record, then the index; returns its rows."""
    root = _directory(directory)
    rows, key_tensors = [], {}
    for record in records:
        name = write_adapter(root, config, record, adapters[record.id], base_model)
        key_tensors[name] = torch.from_numpy(np.ascontiguousarray(keys[record.id], dtype=np.float32))
        rows.append({"name": name, "edit_id": record.id, "prompt": record.prompt, "target": record.target,
                     "paraphrases": list(record.paraphrases), "subject": record.subject,
                     "keys": int(keys[record.id].shape[0])})
    index = {"format": "sola-peft/1", "base_model_name_or_path": base_model, "key_source": config.key_source,
             "metric": config.metric, "threshold": config.threshold, "adapters": rows}
    _replace(root / KEYS_NAME, lambda p: safetensors.torch.save_file(key_tensors, str(p)))
    _replace(root / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))
    return rows


def write_adapter(directory: str | Path, config: RegistryConfig, record: Record, adapter: dict[str, torch.Tensor],
                  base_model: str) -> str:
    """One edit's adapter directory (kept when already there, whole, with these settings); the index is not
    touched. Returns its name. The directory appears whole or not at all (written under a temporary name, then
    renamed), so an engine loading it meanwhile never sees half of it."""
    root = _directory(directory)
    settings = json.dumps(adapter_config(config, base_model), indent=2) + "\n"
    name = adapter_name(record)
    target = root / name
    if not _holds(target, settings):
        tmp = root / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(settings)
        safetensors.torch.save_file(peft_tensors(config, adapter), str(tmp / WEIGHTS_NAME))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return name


def _directory(directory: str | Path) -> Path:
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file, not a directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _holds(target: Path, settings: str) -> bool:
    """Whether an adapter directory is already there, whole, with these settings."""
    config = target / CONFIG_NAME
    return (target / WEIGHTS_NAME).is_file() and config.is_file() and config.read_text() == settings


def _replace(path: Path, write_to) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_to(tmp)
    os.replace(tmp, path)
