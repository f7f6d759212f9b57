"""Forward overhead: SmolLM2 served through a registry of N edits vs the unedited model, same inputs, one run.

    python bench/forward.py                      # N = 0, 1k, 10k, 100k; batch 1 and 16; prompt 32 tokens; +32 generated
    python bench/forward.py --key-source layer   # the same with the paper's in-layer key (writes forward-layer.json)
    python bench/forward.py --encoder-dtype float32  # the encoder key without bfloat16 (forward-float32.json)
    python bench/forward.py --quick              # a tiny random Llama and N <= 40: seconds

The edited model is SmolLM2 patched by ``SolaEditor`` (layer 24's MLP down_proj) with the default key source,
the encoder (a MiniLM pass over each prompt, in bfloat16 where the CPU has it: 384-float keys), or with ``--key-source layer`` (the down_proj
input at the last prompt token: 1536-float keys, no extra model); the unedited one is a deep copy taken before
patching. The registry is filled with ``add_many``: random keys and
adapters for N - 8 edits, plus 8 edits whose keys are the real keys of 8 of the 16 prompts, so half of each
batch of 16 routes to an edit (batch 1 is a routed prompt: the costlier case). The two models run in turn,
round after round, and each round's time ratio is kept; the median ratio is reported.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from common import (clock, interleaved, load_model_or_tiny, machine, parse_args, prompts_of_length, pyplot,
                    real_edits, ratio_summary, save, save_plot, summary, synthetic_edits)

import torch
from tqdm import tqdm

from sola_core import SolaEditor
from sola_core.config import EditConfig, RuntimeConfig
from sola_core.generation import with_positions
from sola_core.keys import key_source

# -- config ------------------------------------------------------------------------------------------
NS = [0, 1_000, 10_000, 100_000]
BATCHES = [1, 16]
PROMPT_TOKENS = 32
NEW_TOKENS = 32
FORWARD_REPS = 7  # interleaved rounds per (N, batch) for one prompt pass
GENERATE_REPS = 5  # ... and for prompt pass + 32 greedy tokens
TARGETS = {10_000: 1.10, 100_000: 1.25}  # time ratio at batch 16 (issue 4)
WORKDIR = None  # registry folder's parent (None: the system temp dir); 100k edits take ~4.6 GB

args = parse_args(__doc__, workdir=(str, WORKDIR, "where to create the temporary registry"),
                  key_source=(str, EditConfig.key_source, "encoder (the default) or layer"),
                  encoder_dtype=(str, RuntimeConfig.encoder_dtype, "auto (the default), float32 or bfloat16"))
NAME = "-".join(["forward"] + [value for value, default in ((args.key_source, EditConfig.key_source),
                                                             (args.encoder_dtype, RuntimeConfig.encoder_dtype))
                               if value != default])
if args.quick:
    NS, FORWARD_REPS, GENERATE_REPS, NEW_TOKENS, PROMPT_TOKENS = [0, 40], 2, 1, 2, 12


# -- setup -------------------------------------------------------------------------------------------
info = machine()
model, tok = load_model_or_tiny(args.quick)
base = copy.deepcopy(model)  # the unedited twin: same weights, never patched
workdir = tempfile.TemporaryDirectory(prefix="sola-bench-forward-", dir=args.workdir)
# A tight threshold for either key source: the bench's word-salad prompts are close to one another in a sentence
# encoder's space, and only the planned rows may route (the threshold does not change what a forward costs).
config = EditConfig(key_source=args.key_source, threshold=0.01)
editor = SolaEditor.open(Path(workdir.name) / "registry", model, tok, config=config,
                         runtime=RuntimeConfig(encoder_dtype=args.encoder_dtype))
prompts = prompts_of_length(tok, max(BATCHES), PROMPT_TOKENS)
hit = list(range(0, max(BATCHES), 2))  # rows 0, 2, 4, ...: half of each batch of 16
enc = with_positions(editor.model, editor.tokenize_batch(prompts))
assert enc["input_ids"].shape == (max(BATCHES), PROMPT_TOKENS), enc["input_ids"].shape
cfg = editor.registry.config
print(f"edited layer {cfg.layers[0].name} ({cfg.layers[0].in_features}->{cfg.layers[0].out_features}), "
      f"key dim {cfg.key_dim}, rank {cfg.rank}")


def bf16_drift(texts: list[str]) -> float | None:
    """Largest cosine distance between a prompt's float32 and bfloat16 encoder keys (None for the layer key)."""
    if cfg.key_source != "encoder":
        return None
    fp32, bf16 = (key_source("encoder", tok, dtype).embed(texts) for dtype in ("float32", "bfloat16"))
    return float((1 - (fp32 * bf16).sum(-1)).max())


def inputs(b: int) -> dict:
    return {k: v[:b] for k, v in enc.items()}


@torch.no_grad()
def forward(m, b: int) -> None:
    m(**inputs(b), logits_to_keep=1)  # as generate's prompt pass: only the last position's logits


@torch.no_grad()
def generate(m, b: int) -> None:
    x = inputs(b)
    m.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=NEW_TOKENS,
               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)


# -- run ---------------------------------------------------------------------------------------------
rows, active = [], 0
bar = tqdm(total=len(NS) * len(BATCHES) * (FORWARD_REPS + GENERATE_REPS), desc="forward")
for n in NS:
    if n > active:
        new = (real_edits(editor, [prompts[i] for i in hit]) if active == 0 else []) + \
              list(synthetic_edits(cfg, n - active - (len(hit) if active == 0 else 0), seed=n))
        build = clock(lambda: editor.registry.add_many(new, check_conflicts=False))
        active = n
        del new
    else:
        build = 0.0
    routed = editor.route(prompts)
    want = [(i in hit) and n > 0 for i in range(len(prompts))]
    assert [r is not None for r in routed] == want, f"routing is not as planned at N={n}: {routed}"
    queries = torch.cat([editor.key(p)[None] for p in prompts])
    for b in BATCHES:
        bar.set_postfix_str(f"N={n} b={b}")
        fwd = interleaved({"base": lambda: forward(base, b), "sola": lambda: forward(model, b)}, FORWARD_REPS,
                          progress=lambda: bar.update())
        gen = interleaved({"base": lambda: generate(base, b), "sola": lambda: generate(model, b)}, GENERATE_REPS,
                          warmup=0, progress=lambda: bar.update())
        search = [clock(lambda: editor.registry.match(queries[:b])) for _ in range(FORWARD_REPS)]
        rows.append({"n": n, "batch": b, "hits": sum(want[:b]), "build_s": build,
                     "forward": {"base": summary(fwd["base"]), "sola": summary(fwd["sola"]),
                                 **ratio_summary(fwd["sola"], fwd["base"])},
                     "generate": {"base": summary(gen["base"]), "sola": summary(gen["sola"]),
                                  **ratio_summary(gen["sola"], gen["base"])},
                     "search": summary(search)})
bar.close()
editor.close()
workdir.cleanup()

targets = [{"n": n, "batch": 16, "target": t, "measured": r["forward"]["ratio_median"],
            "met": r["forward"]["ratio_median"] <= t}
           for n, t in TARGETS.items() for r in rows if r["n"] == n and r["batch"] == 16]
save(args.out, NAME, {"machine": info, "config": {"ns": NS, "batches": BATCHES, "prompt_tokens": PROMPT_TOKENS,
                                                        "new_tokens": NEW_TOKENS, "forward_reps": FORWARD_REPS,
                                                        "generate_reps": GENERATE_REPS, "layer": cfg.layers[0].name,
                                                        "key_source": cfg.key_source, "key_dim": cfg.key_dim,
                                                        "rank": cfg.rank, "encoder_dtype": args.encoder_dtype,
                                                        "encoder_bf16": getattr(editor.router.keys, "bf16", None),
                                                        "key_drift_bf16": bf16_drift(prompts)},
                           "rows": rows, "targets": targets})

plt = pyplot()
fig, ax = plt.subplots(figsize=(7, 4.5))
for b, marker in zip(BATCHES, "os"):
    for mode, style in (("forward", "-"), ("generate", "--")):
        pts = [r for r in rows if r["batch"] == b]
        ax.plot([max(r["n"], 100) for r in pts], [r[mode]["ratio_median"] for r in pts], style + marker,
                label=f"{mode}, batch {b}")
for n, t in TARGETS.items():
    ax.plot([n], [t], "r_", markersize=20, mew=2)
ax.axhline(1.0, color="k", lw=0.5)
ax.set(xscale="log", xlabel="active edits N (0 plotted at 100)", ylabel="time ratio edited / unedited (median)",
       title=f"SmolLM2-135M, {cfg.key_source} key: forward overhead (red: targets at batch 16)")
ax.legend(fontsize=8)
save_plot(fig, args.out, NAME)
for r in rows:
    print(f"N={r['n']:>7} b={r['batch']:>2} hits={r['hits']:>2}  forward {r['forward']['base']['p50_ms']:8.1f} -> "
          f"{r['forward']['sola']['p50_ms']:8.1f} ms (x{r['forward']['ratio_median']:.3f})  generate "
          f"{r['generate']['base']['p50_ms']:8.1f} -> {r['generate']['sola']['p50_ms']:8.1f} ms "
          f"(x{r['generate']['ratio_median']:.3f})  search {r['search']['p50_ms']:.2f} ms")
for t in targets:
    print(f"target N={t['n']} batch 16: ratio {t['measured']:.3f} <= {t['target']}: {'met' if t['met'] else 'MISSED'}")
