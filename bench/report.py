"""Markdown tables from bench/results/*.json: what RESULTS.md and README's "Scale" section show.

    python bench/report.py             # all tables (those whose JSON exists)
    python bench/report.py --headline  # the short table for README

Numbers are only ever copied from the scripts' JSON, never typed by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def n_str(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (f"{n // 1000}k" if n >= 1000 else str(n))


def ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}")


def machine_line(data: dict) -> str:
    m = data["machine"]
    return (f"{m['date']}; {m['cpu']}, nproc {m['nproc']}, {m['ram_gb']} GB RAM, torch threads {m['torch_threads']}, "
            f"load avg at start {m.get('load_avg_1m_at_start')}; torch {m['torch']}, faiss {m['faiss']} "
            f"(GPU faiss: {m['faiss_gpu']}), CUDA: {m['cuda'] or 'none'}. Command: `{m['command']}`")


def routing(data: dict) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in data["rows"]))
    keys = sorted({(r["dim"], r["n"], r["batch"]) for r in data["rows"]})
    by = {(r["backend"], r["dim"], r["n"], r["batch"]): r for r in data["rows"]}
    rows = []
    for dim, n, batch in keys:
        cells = []
        for b in backends:
            r = by.get((b, dim, n, batch))
            cells.append(f"{ms(r['p50_ms'])} / {ms(r['p99_ms'])} (x{r['measured_over_bound']:.1f})" if r else "-")
        bound = next(r["bound_ms"] for (b, d, nn, bb), r in by.items() if (d, nn, bb) == (dim, n, batch))
        rows.append([dim, n_str(n), batch, *cells, ms(bound)])
    skipped = "; ".join(f"{s['backend']} at N={n_str(s['n'])}, d={s['dim']} (needs {s['needs_gb']} GB)"
                        for s in data["skipped"]) or "none"
    return (f"Bandwidth measured {data['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
            f"{data['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s. Cells: p50 / p99 ms (measured p50 / bound). "
            f"Skipped: {skipped}.\n\n"
            + table(["dim", "N", "batch", *backends, "bound ms"], rows))


def forward(data: dict) -> str:
    rows = [[n_str(r["n"]), r["batch"], r["hits"], ms(r["forward"]["base"]["p50_ms"]), ms(r["forward"]["sola"]["p50_ms"]),
             f"{r['forward']['ratio_median']:.3f}", ms(r["generate"]["base"]["p50_ms"]), ms(r["generate"]["sola"]["p50_ms"]),
             f"{r['generate']['ratio_median']:.3f}", ms(r["search"]["p50_ms"])] for r in data["rows"]]
    targets = "; ".join(f"N={n_str(t['n'])} batch 16: {t['measured']:.3f} vs <= {t['target']} "
                        f"({'met' if t['met'] else 'MISSED'})" for t in data["targets"])
    c = data["config"]
    return (f"Prompt {c['prompt_tokens']} tokens, +{c['new_tokens']} generated; {c['forward_reps']} / "
            f"{c['generate_reps']} interleaved rounds; ratio = median over rounds of edited / unedited. "
            f"Targets: {targets or 'n/a'}.\n\n"
            + table(["N", "batch", "rows edited", "forward base ms", "forward SoLA ms", "ratio",
                     "generate base ms", "generate SoLA ms", "ratio", "key search ms"], rows))


def peft(data: dict) -> str:
    rows = [[n_str(r["n"]), ms(r["forward"]["peft"]["p50_ms"]), ms(r["forward"]["sola"]["p50_ms"]),
             f"{r['forward']['sola_over_peft']['ratio_median']:.3f}",
             f"{r['generate']['sola_over_peft']['ratio_median']:.3f}",
             f"{r['memory']['peft_bytes'] / 2**20:.2f}", f"{r['memory']['sola_bytes'] / 2**20:.2f}",
             f"{r['memory']['sola_over_peft']:.2f}", f"{r['max_abs_logit_diff']:.1e}"] for r in data["rows"]]
    return table(["N", "PEFT forward ms", "SoLA forward ms", "forward SoLA/PEFT", "generate SoLA/PEFT",
                  "PEFT MiB", "SoLA MiB", "memory SoLA/PEFT", "max |logit diff|"], rows)


def registry_ops(data: dict) -> str:
    rows = []
    for shape, results in data["results"].items():
        for r in results:
            rows.append([shape, n_str(r["n"]), ms(r["add"]["p50_ms"]), f"{ms(r['rollback']['p50_ms'])} / {ms(r['rollback']['p99_ms'])}",
                         ms(r["restore"]["p50_ms"]), f"{r['open']['p50_ms'] / 1e3:.2f}",
                         f"{r['verify_s']:.1f}" if "verify_s" in r else "-", f"{r['disk_per_edit']:,.0f}",
                         f"{r['disk_over_adapter']:.2f}", f"{r['disk_over_adapter_and_key']:.2f}",
                         f"{peak(r, 'rss') / 2**30:.2f} / {peak(r, 'anon') / 2**30:.2f}",
                         f"{r['build_us_per_edit']:.0f}"])
    fsync = next(iter(data["results"].values()))[0].get("fsync")
    floor = f"One durable 4 KiB write (fdatasync) on this disk: p50 {ms(fsync['p50_ms'])} ms.\n\n" if fsync else ""
    text = floor + table(["shape", "N", "add ms", "rollback ms p50 / p99", "restore ms", "cold open s", "verify s",
                  "disk B/edit", "x raw adapter", "x raw adapter+key", "peak RSS / anon GiB", "bulk add us/edit"], rows)
    notes = "\n".join(f"- {t['what']}: {t['measured']:.3g}" + (f" (target <= {t['target']}: {'met' if t['met'] else 'MISSED'})"
                                                               if "target" in t else "") for t in data["targets"])
    return text + ("\n\n" + notes if notes else "")


def peak(row: dict, kind: str) -> int:
    """Highest of the build, open and verify phases' peaks ("rss" counts mapped LMDB pages, "anon" does not)."""
    return max(row.get(f"{phase}_peak_{kind}_bytes", 0) for phase in ("build", "open", "verify"))


def adapter_cache(data: dict) -> str:
    c = data["config"]
    rows = [[r["s"], f"{r['hit_rate']:.3f}", ms(r["added_ms"]["p50_ms"]), ms(r["added_ms"]["p99_ms"]),
             ms(r["added_ms_all_hits"]["p50_ms"]) if r["added_ms_all_hits"] else "-",
             ms(r["added_ms_with_misses"]["p50_ms"]) if r["added_ms_with_misses"] else "-",
             f"{r['mean_misses_per_batch']:.2f}", f"{r['load_us_per_adapter']:.0f}" if r["load_us_per_adapter"] else "-"]
            for r in data["rows"]]
    return (f"{c['slots']} slots over {n_str(c['n'])} edits on {data['device']}, {c['rows_per_batch']} routed rows per "
            f"batch, {c['batches']} batches after {c['warmup']} warm-up batches.\n\n"
            + table(["Zipf s", "hit rate", "added ms p50", "added ms p99", "p50 all-hit batches",
                     "p50 batches with misses", "misses / batch", "us per loaded adapter"], rows))


def route_call(data: dict) -> str:
    rows, calls = [], {"route": f"route() of {data['prompts']} prompts", "key": "key() of one prompt"}
    checkouts = [c for c in ("before", "after") if c in data["machine"]]
    for r in data["rows"]:
        if r["call"] == "edit":
            continue
        cells = [ms(r[c]["p50_ms"]) for c in checkouts]
        ratio = f"{r['after_over_before']['ratio_median']:.3f}" if "after_over_before" in r else "-"
        rows.append([r["key_source"], calls[r["call"]], *cells, ratio])
    edits = {}
    for r in data["rows"]:
        if r["call"] == "edit":
            edits.setdefault(r["key_source"], {}).update(r)
    for ks, r in edits.items():
        rows.append([ks, f"edit, median of {data['edits']} (s)",
                     *[f"{r[c + '_edit_seconds_median']:.2f}" for c in checkouts], "-"])
    revisions = ", ".join(f"{c} = {data['machine'][c][:7]}" for c in checkouts)
    return (f"{revisions}; {data['rounds']} interleaved rounds; cells: p50 ms (edit: seconds).\n\n"
            + table(["key source", "call", *checkouts, "after / before (median of rounds)"], rows))


def headline(out: Path) -> str:
    rows = []
    for name in ("forward", "forward-layer"):
        if not (fw := load(out, name)):
            continue
        key = f"{fw['config'].get('key_source', 'layer')} key"
        for t in fw["targets"]:
            rows.append([f"forward time, edited / unedited SmolLM2, batch 16, {n_str(t['n'])} edits, {key}",
                         f"{t['measured']:.3f}", f"<= {t['target']}", "met" if t["met"] else "MISSED"])
        for r in fw["rows"]:
            if r["n"] == max(x["n"] for x in fw["rows"]):
                rows.append([f"{'generate 32 tokens' if r['batch'] == 16 else 'forward'}, edited / unedited, "
                             f"batch {r['batch']}, {n_str(r['n'])} edits, {key}",
                             f"{(r['generate'] if r['batch'] == 16 else r['forward'])['ratio_median']:.3f}", "(none)", ""])
    if rt := load(out, "routing"):
        for r in rt["rows"]:
            if r["backend"] == "faiss-cpu" and r["batch"] == 1 and (r["dim"], r["n"]) in ((576, 100_000), (576, 1_000_000), (4096, 100_000)):
                rows.append([f"exact k=1 search, {r['backend']}, {n_str(r['n'])} keys x {r['dim']}, batch 1 (p50)",
                             f"{ms(r['p50_ms'])} ms", f"(bound {ms(r['bound_ms'])} ms)", ""])
    if ops := load(out, "registry_ops"):
        for t in ops["targets"]:
            if "target" in t:
                rows.append([t["what"], f"{t['measured']:.3g}", f"<= {t['target']}", "met" if t["met"] else "MISSED"])
        for name in ("smollm2", "smollm2-layer-key"):
            ref = next((r for r in ops["results"].get(name, []) if r["n"] == 100_000), None)
            if ref:
                rows.append([f"disk / raw (adapter + key) bytes at 100k, {name}", f"{ref['disk_over_adapter_and_key']:.3g}", "", ""])
        big = ops["results"]["small"][-1]
        rows.append([f"rollback / cold open at {n_str(big['n'])} edits (smaller edit shape)",
                     f"{ms(big['rollback']['p50_ms'])} ms / {big['open']['p50_ms'] / 1e3:.1f} s", "", ""])
    if cache := load(out, "adapter_cache"):
        r = next((r for r in cache["rows"] if r["s"] == 1.0), cache["rows"][0])
        rows.append([f"adapter cache hit rate, Zipf s={r['s']}, {cache['config']['slots']} slots / "
                     f"{n_str(cache['config']['n'])} edits", f"{r['hit_rate']:.3f}", "", ""])
        rows.append(["adapter cache added latency per batch of 16 (p50 / p99)",
                     f"{ms(r['added_ms']['p50_ms'])} / {ms(r['added_ms']['p99_ms'])} ms", "", ""])
    if pp := load(out, "peft_peer"):
        r = pp["rows"][-1]
        rows.append([f"vs PEFT at {n_str(r['n'])} adapters: forward time / memory", f"{r['forward']['sola_over_peft']['ratio_median']:.3f}"
                     f" / {r['memory']['sola_over_peft']:.2f}", "", ""])
    if rc := load(out, "route_call"):
        for r in rc["rows"]:
            if r["call"] == "route" and "after_over_before" in r:
                rows.append([f"route() of {rc['prompts']} prompts, {r['key_source']} key, p50: before / after "
                             f"({rc['machine']['before'][:7]} / {rc['machine']['after'][:7]})",
                             f"{ms(r['before']['p50_ms'])} / {ms(r['after']['p50_ms'])} ms", "", ""])
    return table(["measure", "value", "target", ""], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--headline", action="store_true")
    args = parser.parse_args()
    if args.headline:
        print(headline(args.out))
        return
    for name, render in (("routing", routing), ("forward", forward), ("forward-layer", forward), ("peft_peer", peft),
                         ("registry_ops", registry_ops), ("adapter_cache", adapter_cache), ("route_call", route_call)):
        data = load(args.out, name)
        if data:
            print(f"### {name}\n\n{machine_line(data)}\n\n{render(data)}\n")


if __name__ == "__main__":
    main()
