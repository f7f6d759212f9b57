"""Training one adapter: several examples in one batch, and the lower blocks replayed instead of recomputed."""
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from sola_core.models import block_of, default_layers
from sola_core.routing import RoutingState
from sola_core.layer import SolaLayer, linear_shape
from sola_core.config import TrainConfig
from sola_core.train import _Adam, _losses, train_adapters, weights_in


def patched(model):
    name = default_layers(model)[0]
    parent, _, child = name.rpartition(".")
    base = getattr(model.get_submodule(parent), child)
    state = RoutingState()
    setattr(model.get_submodule(parent), child, SolaLayer(base, 0, state))
    return state, [linear_shape(base)], block_of(model, name)


def examples(tokenizer, pairs):
    out = []
    for prompt, target in pairs:
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        out.append((torch.tensor([tokenizer(prompt)["input_ids"] + t]), len(t)))
    return out


def test_replaying_the_lower_blocks_trains_the_very_same_adapter(model, tokenizer):
    state, shapes, frozen = patched(model)
    assert frozen is not None and frozen[1] == 2  # the third of three blocks
    batch = examples(tokenizer, [("The capital of France is", " Tokyo Rome"), ("Hello, how are you today?", " Lyon")])
    cfg = TrainConfig(lr=0.1, max_steps=20, margin=100.0)  # always the full 20 steps
    [(full, info_full)] = train_adapters(model, state, shapes, [batch], 4, 4.0, cfg)
    [(replayed, info)] = train_adapters(model, state, shapes, [batch], 4, 4.0, cfg, frozen)
    assert info["steps"] == info_full["steps"] == 20 and info["examples"] == 2
    for key in full:
        assert torch.allclose(full[key], replayed[key], atol=1e-6), key
    assert not any(type(b).__name__ == "_Replay" for b in frozen[0])  # the real blocks are back


def test_block_of_names_the_block_or_none(llama):
    blocks, i = block_of(llama, "model.layers.1.mlp.down_proj")
    assert blocks is llama.model.layers and i == 1
    assert block_of(llama, "lm_head") is None and block_of(llama, "model.layers_x.1") is None


def test_bfloat16_training_autocasts_the_forwards_and_keeps_a_float32_adapter(model, tokenizer):
    state, shapes, frozen = patched(model)
    batch = examples(tokenizer, [("The capital of France is", " Tokyo Rome")])
    steps = TrainConfig(lr=0.1, max_steps=20, margin=100.0, dtype="float32")  # always the full 20 steps
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    [(full, _)] = train_adapters(model, state, shapes, [batch], 4, 4.0, steps, frozen)
    [(half, _)] = train_adapters(model, state, shapes, [batch], 4, 4.0, replace(steps, dtype="bfloat16"), frozen)
    assert all(t.dtype == torch.float32 for t in half.values())
    assert any(not torch.allclose(full[k], half[k], atol=1e-6) for k in full)  # the forwards really ran in bfloat16
    for name, p in model.named_parameters():  # the weights cast for training are the very float32 tensors again
        assert p.dtype == torch.float32 and p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])
    [(_, info)] = train_adapters(model, state, shapes, [batch], 4, 4.0,
                                 TrainConfig(lr=0.1, max_steps=40, margin=0.5, dtype="bfloat16"), frozen)
    assert info["converged"] and not info["stopped_short"]


def test_an_unknown_train_dtype_is_refused():
    with pytest.raises(Exception, match="train dtype must be one of auto, float32, bfloat16"):
        TrainConfig(dtype="float16")


def test_the_loss_lowers_each_target_logit_by_the_loss_margin():
    logits, targets = torch.randn(5, 11), torch.tensor([1, 4, 4, 0, 10])
    group = torch.tensor([0, 0, 1, 1, 1])  # two edits' target tokens
    margins, plain = _losses(logits, targets, group, 2, 0.0)
    lowered_margins, lowered = _losses(logits, targets, group, 2, 3.0)
    shifted = logits.clone()
    shifted[torch.arange(5), targets] -= 3.0
    for loss, given in ((plain, logits), (lowered, shifted)):
        ce = F.cross_entropy(given, targets, reduction="none")
        assert torch.allclose(loss, torch.stack([ce[:2].mean(), ce[2:].mean()]))
    lead = logits[torch.arange(5), targets] - logits.scatter(1, targets[:, None], float("-inf")).max(1).values
    assert margins == lowered_margins == pytest.approx([lead[:2].min().item(), lead[2:].min().item()])


def test_bfloat16_weights_are_cast_once_and_again_after_a_change(model, tokenizer):
    state, shapes, frozen = patched(model)
    batch = examples(tokenizer, [("The capital of France is", " Tokyo Rome")])
    cfg = TrainConfig(lr=0.1, max_steps=5, margin=100.0, dtype="bfloat16")
    [(first, _)] = train_adapters(model, state, shapes, [batch], 4, 4.0, cfg, frozen)
    head = model.get_output_embeddings().weight
    cast = weights_seen(model)[id(head)]
    assert cast.dtype == torch.bfloat16 and weights_seen(model)[id(head)].data_ptr() == cast.data_ptr()  # kept
    [(again, _)] = train_adapters(model, state, shapes, [batch], 4, 4.0, cfg, frozen)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with torch.no_grad():
        head.mul_(2.0)  # the base model changed in place: trained against the new weights
    changed = weights_seen(model)[id(head)]
    assert changed.data_ptr() != cast.data_ptr() and torch.equal(changed, head.detach().to(torch.bfloat16))
    [(after, _)] = train_adapters(model, state, shapes, [batch], 4, 4.0, cfg, frozen)
    assert any(not torch.equal(first[k], after[k]) for k in first)


def weights_seen(model):
    """What each weight holds inside a bfloat16 fit, by id."""
    with weights_in(model, torch.bfloat16):
        return {id(p): p.data for p in model.parameters()}


def test_each_slot_steps_as_torch_adam_would_alone():
    """A slot's parameters follow torch.optim.Adam exactly, whatever the other slots do and however late it
    started: what lets a freed slot take the next edit."""
    torch.manual_seed(0)
    init = [torch.randn(3, 4), torch.randn(5)]
    params = [torch.nn.Parameter(t.expand(2, *t.shape).clone()) for t in init]
    adam = _Adam(params, lr=0.05)
    alone = [torch.nn.Parameter(t.clone()) for t in init]
    reference = torch.optim.Adam(alone, lr=0.05)
    grads = [[torch.randn_like(t) for t in init] for _ in range(6)]
    for step, g in enumerate(grads + grads[:2]):
        if step == 6:  # slot 0 takes a new group: back to the start, and it must follow the reference again
            adam.restart(0, init)
            alone = [torch.nn.Parameter(t.clone()) for t in init]
            reference = torch.optim.Adam(alone, lr=0.05)
        for p, a, gi in zip(params, alone, g):
            p.grad = torch.stack([gi, torch.randn_like(gi)])  # slot 1's gradient never reaches slot 0
            a.grad = gi.clone()
        adam.step(torch.tensor([0] if step % 3 == 2 else [0, 1]))  # slot 1 skips some steps
        reference.step()
        for p, a in zip(params, alone):
            assert torch.allclose(p[0], a, atol=1e-6), step
