"""Peer: the same mixed batch through Hugging Face PEFT (one LoRA adapter per edit, per-row ``adapter_names``).

    python bench/peft_peer.py          # SmolLM2, N = 10, 100, 1000 edits, batch 16 (8 rows edited), ~7 min
    python bench/peft_peer.py --quick  # a tiny random Llama: seconds

For each N both systems hold the same N rank-4 adapters on SmolLM2's layer-24 MLP down_proj, with the same
weights. Ours: a ``SolaEditor`` registry (routing by exact key search, adapters through the device cache,
sized min(N, 1024) slots); PEFT: a ``PeftModel`` with N named LoRA adapters, told each row's adapter
(``"__base__"`` for unedited rows) -- PEFT is given the routing we compute. Both run the same 16 prompts of
32 tokens, interleaved with the unedited model, as one prompt pass and as prompt pass + 32 greedy tokens.
Their logits for the batch are compared first (they must agree), then timed.

Memory: bytes of the tensors each system keeps for its edits (PEFT: every adapter's A and B; ours: the
cache's stacked slots plus the key index), and the growth of this process's RSS while each is set up.
"""
from __future__ import annotations

import copy
import gc
import tempfile
from pathlib import Path

from common import (interleaved, load_model_or_tiny, machine, parse_args, prompts_of_length, pyplot, ratio_summary,
                    rss_bytes, save, save_plot, summary, synthetic_edits)

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from sola_core import EditConfig, RuntimeConfig, SolaEditor
from sola_core.generation import with_positions

# -- config ------------------------------------------------------------------------------------------
NS = [10, 100, 1_000]
BATCH, HITS = 16, 8
PROMPT_TOKENS, NEW_TOKENS = 32, 32
FORWARD_REPS, GENERATE_REPS = 7, 3

args = parse_args(__doc__)
if args.quick:
    NS, BATCH, HITS, PROMPT_TOKENS, NEW_TOKENS, FORWARD_REPS, GENERATE_REPS = [4, 8], 4, 2, 12, 2, 2, 1


def index_bytes(editor: SolaEditor) -> int:
    return editor.registry._ensure_index().nbytes  # built by the first routed forward


def lora_bytes(model) -> int:
    return sum(p.element_size() * p.numel() for name, p in model.named_parameters() if "lora_" in name)


def build_peft(base, layer: str, adapters: list[dict], rank: int, alpha: float):
    """A PeftModel on a copy of ``base`` holding one named adapter per edit, weights set to ours."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[layer], lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name="e0")
    for i in range(1, len(adapters)):
        peft_model.add_adapter(f"e{i}", config)
    module = peft_model.base_model.model.get_submodule(layer)
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            module.lora_A[f"e{i}"].weight.copy_(adapter["0.A"])  # (r, in)
            module.lora_B[f"e{i}"].weight.copy_(adapter["0.B"])  # (out, r)
    return peft_model.eval()


# -- setup -------------------------------------------------------------------------------------------
info = machine()
model, tok = load_model_or_tiny(args.quick)
base = copy.deepcopy(model)
prompts = prompts_of_length(tok, BATCH, PROMPT_TOKENS)
hit_rows = list(range(0, 2 * HITS, 2))
rows = []
bar = tqdm(total=len(NS) * (FORWARD_REPS + GENERATE_REPS), desc="peft peer")
for n in NS:
    gc.collect()
    tmp = tempfile.TemporaryDirectory(prefix="sola-bench-peft-")
    rss0 = rss_bytes()
    # A tight threshold: the bench's word-salad prompts lie close together in the encoder's space, and only the
    # planned rows may route (the threshold does not change what a forward costs). As in forward.py.
    editor = SolaEditor.open(Path(tmp.name) / "registry", model, tok, config=EditConfig(threshold=0.01),
                             runtime=RuntimeConfig(cache_slots=min(n, 1024)))
    cfg = editor.registry.config
    layer = cfg.layers[0].name
    edits = list(synthetic_edits(cfg, n, seed=n, scale=0.05))
    for edit, row in zip(edits, hit_rows):  # the first HITS edits are real prompts' edits
        edit["prompt"], edit["keys"] = prompts[row], editor.key(prompts[row]).cpu().numpy()
    ids = editor.registry.add_many(edits, check_conflicts=False)
    enc = with_positions(editor.model, editor.tokenize_batch(prompts))
    with torch.no_grad():
        ours = model(**enc, logits_to_keep=1).logits[:, -1]
    ours_rss = rss_bytes() - rss0
    routed = editor.route(prompts)
    assert routed == [ids[hit_rows.index(r)] if r in hit_rows else None for r in range(BATCH)], routed
    names = [f"e{hit_rows.index(r)}" if r in hit_rows else "__base__" for r in range(BATCH)]

    rss1 = rss_bytes()
    peft_model = build_peft(base, layer, [e["adapter"] for e in edits], cfg.rank, cfg.alpha)
    peft_rss = rss_bytes() - rss1
    with torch.no_grad():
        theirs = peft_model(**enc, adapter_names=names, logits_to_keep=1).logits[:, -1]
        plain = base(**enc, logits_to_keep=1).logits[:, -1]
    adapter = torch.ones(ours.shape[-1], dtype=torch.bool)
    adapter[editor.router.ends] = False  # ruled out after an edited prompt by the router, not by the adapter
    agree = float((ours[:, adapter] - theirs[:, adapter]).abs().max())
    assert agree < 1e-3 * max(1.0, float(theirs.abs().max())), f"PEFT and SoLA disagree by {agree}"
    assert all(not torch.equal(ours[r], plain[r]) for r in hit_rows), "an edited row did not change"

    def fwd(m, **kw):
        with torch.no_grad():
            m(**enc, logits_to_keep=1, **kw)

    def gen(m, **kw):
        with torch.no_grad():
            m.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id, **kw)

    bar.set_postfix_str(f"N={n}")
    f = interleaved({"base": lambda: fwd(base), "sola": lambda: fwd(model), "peft": lambda: fwd(peft_model, adapter_names=names)},
                    FORWARD_REPS, progress=lambda: bar.update())
    g = interleaved({"base": lambda: gen(base), "sola": lambda: gen(model), "peft": lambda: gen(peft_model, adapter_names=names)},
                    GENERATE_REPS, warmup=0, progress=lambda: bar.update())
    ours_bytes = index_bytes(editor) + editor.cache.nbytes
    theirs_bytes = lora_bytes(peft_model)
    rows.append({"n": n, "max_abs_logit_diff": agree,
                 "forward": {k: summary(v) for k, v in f.items()} | {"sola_over_peft": ratio_summary(f["sola"], f["peft"]),
                                                                     "peft_over_base": ratio_summary(f["peft"], f["base"]),
                                                                     "sola_over_base": ratio_summary(f["sola"], f["base"])},
                 "generate": {k: summary(v) for k, v in g.items()} | {"sola_over_peft": ratio_summary(g["sola"], g["peft"]),
                                                                      "peft_over_base": ratio_summary(g["peft"], g["base"]),
                                                                      "sola_over_base": ratio_summary(g["sola"], g["base"])},
                 "memory": {"sola_bytes": ours_bytes, "peft_bytes": theirs_bytes, "sola_over_peft": ours_bytes / theirs_bytes,
                            "sola_index_bytes": index_bytes(editor), "sola_cache_bytes": editor.cache.nbytes,
                            "sola_cache_slots": editor.cache.capacity,
                            "sola_rss_growth": ours_rss, "peft_rss_growth": peft_rss}})
    editor.close()  # puts the original layers back, so `model` is plain again for the next N
    del peft_model
    tmp.cleanup()
bar.close()

save(args.out, "peft_peer", {"machine": info, "config": {"ns": NS, "batch": BATCH, "hits": HITS,
                                                         "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                                                         "forward_reps": FORWARD_REPS, "generate_reps": GENERATE_REPS},
                             "rows": rows})

plt = pyplot()
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
ns = [r["n"] for r in rows]
for mode, style in (("forward", "-o"), ("generate", "--s")):
    axes[0].plot(ns, [r[mode]["sola_over_peft"]["ratio_median"] for r in rows], style, label=f"{mode}: SoLA / PEFT")
axes[0].axhline(1.0, color="k", lw=0.5)
axes[0].set(xscale="log", xlabel="edits N", ylabel="time ratio (median of rounds)", title=f"batch {BATCH}, {HITS} rows edited")
axes[1].plot(ns, [r["memory"]["sola_bytes"] / 2**20 for r in rows], "-o", label="SoLA: cache slots + key index")
axes[1].plot(ns, [r["memory"]["peft_bytes"] / 2**20 for r in rows], "-s", label="PEFT: all LoRA weights")
axes[1].set(xscale="log", yscale="log", xlabel="edits N", ylabel="MiB", title="memory held for edits")
for ax in axes:
    ax.legend(fontsize=8)
save_plot(fig, args.out, "peft_peer")
for r in rows:
    print(f"N={r['n']:>5}: forward SoLA/PEFT x{r['forward']['sola_over_peft']['ratio_median']:.3f}, generate "
          f"x{r['generate']['sola_over_peft']['ratio_median']:.3f}, memory x{r['memory']['sola_over_peft']:.2f} "
          f"({r['memory']['sola_bytes'] / 2**20:.1f} vs {r['memory']['peft_bytes'] / 2**20:.1f} MiB), logits agree to {r['max_abs_logit_diff']:.1e}")
