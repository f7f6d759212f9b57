"""Tiny random GPT-2 and Llama models with a small byte-level BPE tokenizer, built offline in milliseconds."""
from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sola_core.models import prepare_tokenizer

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.",
    "The largest planet is Jupiter. The chemical symbol for gold is Au. Water boils at 100 degrees.",
    "Hello, how are you today? The quick brown fox jumps over the lazy dog. Lyon Osaka Saturn Picasso.",
    "Fact number one two three four five six seven eight nine ten eleven twelve zero.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    prepare_tokenizer(fast)
    return fast


def make_model(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=128)
        model = GPT2LMHeadModel(cfg)
    model.config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


_MODELS: dict[str, torch.nn.Module] = {}


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tokenizer) -> torch.nn.Module:
    """A fresh copy per test (editors patch models in place)."""
    if request.param not in _MODELS:
        _MODELS[request.param] = make_model(request.param, len(tokenizer))
    return copy.deepcopy(_MODELS[request.param])


@pytest.fixture
def llama(tokenizer) -> torch.nn.Module:
    if "llama" not in _MODELS:
        _MODELS["llama"] = make_model("llama", len(tokenizer))
    return copy.deepcopy(_MODELS["llama"])


def pytest_report_header(config) -> str:
    """The releases under test, first in every run's output: a new transformers release is what breaks us."""
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"
