"""Every edit exportable as a PEFT LoRA adapter: PEFT loads it and gives the editor's routed logits, and the
directory passes the rules vLLM applies when it loads an adapter."""
import copy
import json
import re

import pytest
import safetensors.torch
import torch
from torch import nn

from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.layer import linear_shape

peft = pytest.importorskip("peft")

TRAIN = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
PROMPTS = ["The capital of France is", "The largest planet is"]
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank's legal values; an adapter needs r <= it


def vllm_problems(directory, model: nn.Module, max_lora_rank: int = 8) -> list[str]:
    """What vLLM's loader would refuse (vllm/lora/peft_helper.py, lora_model.py, utils.py as described in
    ../shared/research/serving_engines.md): required config fields, no DoRA / bias / modules_to_save, r within
    max_lora_rank, and every tensor name parsing to `<module>.lora_A|lora_B.weight` of a linear the model has."""
    assert max_lora_rank in VLLM_RANKS
    config = json.loads((directory / "adapter_config.json").read_text())
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    problems += [f"{k} is set" for k in ("use_dora", "modules_to_save") if config.get(k)]
    if config.get("bias", "none") != "none":
        problems.append("bias is not none")
    if config.get("peft_type") != "LORA":
        problems.append("peft_type is not LORA")
    if not isinstance(config.get("lora_alpha"), int):
        problems.append("lora_alpha is not an int")
    if config.get("r", 0) > max_lora_rank:
        problems.append(f"r {config['r']} > max_lora_rank {max_lora_rank}")
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key in safetensors.torch.load_file(str(directory / "adapter_model.safetensors")):
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_[AB]\.weight", key)
        if match is None or match.group(1) not in linears:
            problems.append(f"tensor {key} names no linear of the model")
    return problems


@pytest.fixture
def exported(tmp_path, llama, tokenizer):
    base = copy.deepcopy(llama)  # the editor patches llama in place; PEFT gets an untouched copy
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = [editor.edit(p, t, TRAIN) for p, t in zip(PROMPTS, [" Lyon", " Mars"])]
        rows = editor.registry.export_peft(tmp_path / "peft", base_model="tiny-llama")
        logits = [editor.logits([p]) for p in PROMPTS]
        yield editor, ids, rows, logits, base, tmp_path / "peft"


def of_the_adapter(editor, edited: torch.Tensor) -> torch.Tensor:
    """Which of an edited row's last logits the adapter gives: all but the end tokens, which the router rules out
    after an edited prompt (PEFT and vLLM get the adapter alone)."""
    adapter = torch.ones(edited.shape[-1], dtype=torch.bool)
    adapter[editor.router.ends] = False
    assert edited[:, ~adapter].isneginf().all()
    return adapter


def test_peft_loads_an_exported_edit_and_gives_the_routed_logits(exported, tokenizer):
    editor, ids, rows, logits, base, out = exported
    assert [r["edit_id"] for r in rows] == ids
    for row, prompt, want in zip(rows, PROMPTS, logits):
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / row["name"])).eval()
        enc = tokenizer([prompt], return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            got = model(**enc).logits[:, -1]  # the editor gives the last position's
        adapter = of_the_adapter(editor, want)
        assert torch.allclose(got[:, adapter], want[:, adapter], atol=1e-5, rtol=0)  # float32 rounding only
        with torch.no_grad(), model.disable_adapter():
            plain = model(**enc).logits[:, -1, adapter]
            assert not torch.allclose(plain, want[:, adapter], atol=1e-3)  # the adapter is what changes them


def test_the_directory_is_what_vllm_and_peft_expect(exported):
    editor, ids, rows, _, base, out = exported
    name = rows[0]["name"]
    record = editor.registry.get(ids[0])
    assert name == f"edit-{ids[0]}-{record.adapter_sha256[:12]}"
    assert vllm_problems(out / name, base) == []
    config = json.loads((out / name / "adapter_config.json").read_text())
    layer = editor.registry.config.layers[0]
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tiny-llama"
    assert config["r"] == editor.registry.config.rank and config["target_modules"] == [layer.name]
    tensors = safetensors.torch.load_file(str(out / name / "adapter_model.safetensors"))
    in_f, out_f = linear_shape(base.get_submodule(layer.name))
    assert tensors[f"base_model.model.{layer.name}.lora_A.weight"].shape == (config["r"], in_f)
    assert tensors[f"base_model.model.{layer.name}.lora_B.weight"].shape == (out_f, config["r"])


def test_the_index_names_every_edit_and_its_keys_and_export_is_incremental(exported):
    editor, ids, rows, _, _, out = exported
    index = json.loads((out / "index.json").read_text())
    assert [r["name"] for r in index["adapters"]] == [r["name"] for r in rows]
    assert index["key_source"] == "encoder" and index["threshold"] == editor.registry.config.threshold
    keys = safetensors.torch.load_file(str(out / "keys.safetensors"))
    for row, eid in zip(rows, ids):
        assert torch.equal(keys[row["name"]], torch.from_numpy(editor.registry.keys(eid)))
    weights = out / rows[0]["name"] / "adapter_model.safetensors"
    written = weights.stat().st_mtime_ns
    editor.rollback(ids[1])
    again = editor.registry.export_peft(out, base_model="tiny-llama")
    assert [r["edit_id"] for r in again] == [ids[0]]  # a rolled-back edit is no longer named ...
    assert (out / rows[1]["name"]).is_dir()  # ... but its immutable directory stays
    assert weights.stat().st_mtime_ns == written  # and what was already there is not rewritten


def test_a_fractional_alpha_is_folded_into_b(tmp_path, llama, tokenizer):
    base = copy.deepcopy(llama)
    config = EditConfig(key_source="encoder", alpha=5.5, rank=4)  # vLLM wants an integer lora_alpha
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=config) as editor:
        editor.edit(PROMPTS[0], " Lyon", TRAIN)
        (row,) = editor.registry.export_peft(tmp_path / "peft", base_model="tiny-llama")
        want = editor.logits([PROMPTS[0]])
    exported_config = json.loads((tmp_path / "peft" / row["name"] / "adapter_config.json").read_text())
    assert exported_config["lora_alpha"] == 4  # = r: the scale 5.5 / 4 went into B
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / row["name"])).eval()
    with torch.no_grad():
        got = model(**tokenizer([PROMPTS[0]], return_tensors="pt", return_token_type_ids=False)).logits[:, -1]
    adapter = of_the_adapter(editor, want)
    assert torch.allclose(got[:, adapter], want[:, adapter], atol=1e-5, rtol=0)
