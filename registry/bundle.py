"""Export bundles: many edits in ONE safetensors file that another registry can import.

Tensors are ``"{n}.key"`` (the edit's keys, one row per phrasing; format 1 held one key of shape (dim,)) and
``"{n}.{i}.A"`` / ``"{n}.{i}.B"`` for the bundle-local index n;
the safetensors metadata holds ``{"sola_bundle": "1", "manifest": <json>}``, where the manifest
carries the format version, the model-binding part of the config and the records. Nothing in a
bundle is ever used as a file path.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from .codec import LIBRARY_VERSION, adapter_shapes, as_keys, check_adapter
from .errors import BundleError, ValidationError
from .transaction import NewEdit
from .types import Record, RegistryConfig

BUNDLE_FORMAT = 2
READ_FORMATS = (1, 2)  # 2: several keys per edit, and paraphrases
# Config fields that make an edit meaningful only for the model it was made on.
BINDING_FIELDS = ("key_dim", "layers", "rank", "alpha", "key_source", "fingerprint")


def _binding(config: RegistryConfig) -> dict:
    full = config.to_dict()
    return {name: full[name] for name in BINDING_FIELDS} | {"metric": config.metric}


def write(path: str, config: RegistryConfig, records: list[Record],
          keys: dict[int, np.ndarray], adapters: dict[int, dict[str, torch.Tensor]]) -> None:
    """Write atomically: a temporary file renamed into place."""
    tensors = {}
    for n, rec in enumerate(records):
        tensors[f"{n}.key"] = torch.from_numpy(np.array(keys[rec.id], dtype=np.float32))
        for name, tensor in adapters[rec.id].items():
            tensors[f"{n}.{name}"] = tensor.contiguous()
    manifest = {
        "format": BUNDLE_FORMAT, "library_version": LIBRARY_VERSION, "config": _binding(config),
        "records": [{"id": r.id, "prompt": r.prompt, "target": r.target, "status": r.status,
                     "info": r.info, "paraphrases": r.paraphrases, "subject": r.subject} for r in records],
    }
    metadata = {"sola_bundle": "1", "manifest": json.dumps(manifest, allow_nan=False)}
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise BundleError(f"cannot write {path}: the directory {directory} does not exist")
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique per writer
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, OSError):  # safetensors' own error types
            raise BundleError(f"cannot write {path}: {exc}") from None
        raise


def read(path: str, config: RegistryConfig) -> list[NewEdit]:
    """Validate a bundle completely and return its edits, ready for one write transaction."""
    if not os.path.isfile(path):
        raise BundleError(f"no bundle at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata, names = f.metadata() or {}, set(f.keys())
            manifest = _manifest(path, metadata)
            _check_compatible(manifest["config"], config)
            records = manifest["records"]
            _check_names(names, len(records), config)
            return [_edit(f, n, rec, config) for n, rec in enumerate(records)]
    except BundleError:
        raise
    except Exception as exc:  # safetensors raises its own types for a bad header
        raise BundleError(f"{path} is not a readable SoLA bundle: {exc}") from None


def _manifest(path: str, metadata: dict) -> dict:
    if metadata.get("sola_bundle") != "1":
        raise BundleError(f"{path} is not a SoLA bundle")
    try:
        manifest = json.loads(metadata["manifest"])
    except (KeyError, ValueError) as exc:
        raise BundleError(f"{path} has a bad manifest: {exc}") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version not in READ_FORMATS:
        raise BundleError(f"{path} has bundle format {version!r}; this version reads formats "
                          f"{', '.join(map(str, READ_FORMATS))}")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("records"), list):
        raise BundleError(f"{path} has a bad manifest: config or records are missing")
    return manifest


def _check_compatible(theirs: dict, config: RegistryConfig) -> None:
    ours = _binding(config)
    for name in BINDING_FIELDS:
        if theirs.get(name) != ours[name]:
            raise BundleError(
                f"bundle was made for another model or setup: its {name} differs from this registry's"
            )


def _check_names(names: set[str], count: int, config: RegistryConfig) -> None:
    expected = {f"{n}.key" for n in range(count)}
    expected |= {f"{n}.{name}" for n in range(count) for name in adapter_shapes(config)}
    if names != expected:
        odd = sorted(names ^ expected)[:3]
        raise BundleError(f"bundle tensors do not match its manifest (e.g. {', '.join(odd)})")


def _edit(f, n: int, rec: dict, config: RegistryConfig) -> NewEdit:
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("target"), str):
        raise BundleError(f"bundle edit {n}: the manifest record needs string prompt and target")
    info = rec.get("info") or {}
    if not isinstance(info, dict):
        raise BundleError(f"bundle edit {n}: info must be a JSON object")
    adapter = {name: f.get_tensor(f"{n}.{name}") for name in adapter_shapes(config)}
    check_adapter(adapter, config, error=BundleError, what=f"bundle edit {n} adapter")
    keys = f.get_tensor(f"{n}.key")
    if keys.dtype != torch.float32:
        raise BundleError(f"bundle edit {n}: key has dtype {keys.dtype}, expected torch.float32")
    try:
        return NewEdit.checked(config, rec["prompt"], rec["target"], as_keys(keys, config.key_dim), adapter,
                              {**info, "imported_from_id": rec.get("id")}, rec.get("paraphrases") or [],
                              rec.get("subject"))
    except ValidationError as exc:
        raise BundleError(f"bundle edit {n}: {exc}") from None
