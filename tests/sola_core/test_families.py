"""The default edited layer, found in every decoder family by shape, and a full edit cycle on each (tiny random
configs: open, edit, target generated, unrelated prompts bit-identical, rollback bit-identical)."""
import copy

import pytest
import torch
import transformers

from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.models import default_layers

SMALL = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128)
GPT = dict(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=128)
# family: (config class, model class, settings, the MLP output projection of block 1)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT, "transformer.h.1.mlp.c_proj"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "num_key_value_heads": 2}, "model.layers.1.mlp.down_proj"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SMALL, "num_key_value_heads": 2}, "model.layers.1.mlp.down_proj"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**SMALL, "num_key_value_heads": 2}, "model.layers.1.mlp.down_proj"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**SMALL, "num_key_value_heads": 2, "head_dim": 8}, "model.layers.1.mlp.down_proj"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32), "model.decoder.layers.1.fc2"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**GPT, "rotary_dim": 4}, "transformer.h.1.mlp.fc_out"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {**GPT, "rotary_dim": 4, "n_ctx": 128}, "transformer.h.1.mlp.fc_out"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL, "gpt_neox.layers.1.mlp.dense_4h_to_h"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", GPT, "transformer.h.1.mlp.c_proj"),
    "phi": ("PhiConfig", "PhiForCausalLM", SMALL, "model.layers.1.mlp.fc2"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=512, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4), "transformer.h.1.mlp.dense_4h_to_h"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=512, hidden_size=32, n_layer=2, n_head=4),
              "transformer.h.1.mlp.dense_4h_to_h"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {**SMALL, "num_key_value_heads": 2}, "model.layers.1.mlp.c_proj"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {**SMALL, "num_key_value_heads": 2}, "model.layers.1.mlp.down_proj"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", SMALL, "model.layers.1.mlp.down_proj"),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4,
                attention_types=[[["global"], 2]], max_position_embeddings=128), "transformer.h.1.mlp.c_proj"),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(vocab_size=512, d_model=32, num_layers=2, attention_heads=4,
             ffn_dim=64, max_position_embeddings=128), "model.layers.1.fc2"),
}
CONFIG = EditConfig(key_source="layer", threshold=1e-4)
TRAIN = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
PROMPT, TARGET = "The capital of France is", " Tokyo"
UNRELATED = ["Hello, how are you today?", "Water boils at"]


def build(family: str, vocab: int) -> torch.nn.Module:
    config_name, model_name, settings, _ = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**settings, "vocab_size": vocab})
    config.pad_token_id = 0
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_edits_serves_and_rolls_back(family, tmp_path, tokenizer):
    model = build(family, len(tokenizer))
    assert default_layers(model) == [FAMILIES[family][3]]
    base = copy.deepcopy(model)
    release = f"{family} on transformers {transformers.__version__}"
    with SolaEditor.open(tmp_path / "r", model, tokenizer, config=CONFIG) as editor:
        before, unrelated = editor.logits([PROMPT]), editor.logits(UNRELATED)
        eid = editor.edit(PROMPT, TARGET, TRAIN)
        n = len(tokenizer(TARGET, add_special_tokens=False)["input_ids"])
        assert editor.generate([PROMPT], n) == [TARGET], release
        assert editor.routed() == [eid], release
        assert torch.equal(editor.logits(UNRELATED), unrelated), release
        editor.rollback(eid)
        assert torch.equal(editor.logits([PROMPT]), before), release
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="pass the layer names explicitly"):
        default_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
