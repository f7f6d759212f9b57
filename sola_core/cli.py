"""`sola`: the admin CLI. Each command is a thin layer over EditRegistry / SolaEditor.

Commands that need no model (list, show, rollback, restore, stats, verify, export, import) never load one.
"""
from __future__ import annotations

import json
import sys
from itertools import islice
from dataclasses import asdict
from pathlib import Path

import click

from registry import EditRegistry
from registry.errors import RegistryError

from .config import EditConfig, RuntimeConfig, TrainConfig
from .models import DEFAULT_MODEL, ModelLoadError

USER_ERRORS = (RegistryError, ModelLoadError, ValueError, OSError)


class SolaGroup(click.Group):
    """Turns domain errors into one `Error: ...` line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e) or type(e).__name__) from e


def emit(rows, as_json: bool, columns: list[str] | None = None) -> None:
    """Print dicts as JSON (`--json`) or as an aligned table / key: value lines."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if isinstance(rows, dict):
        for key, value in rows.items():
            click.echo(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        return
    columns = columns or (list(rows[0]) if rows else [])
    table = [["" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns)]
    for line in [columns, *table]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def say(as_json: bool, data: dict, text: str) -> None:
    """A write command's result: the data with --json, one sentence without."""
    click.echo(json.dumps(data, indent=2) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def registry_path(ctx: click.Context) -> str:
    path = ctx.obj["registry"]
    if not path:
        raise click.UsageError("no registry given: pass --registry DIR or set SOLA_REGISTRY")
    return path


def open_registry(ctx: click.Context, readonly: bool = False) -> EditRegistry:
    registry = EditRegistry.open(registry_path(ctx), readonly=readonly)
    ctx.call_on_close(registry.close)
    return registry


def open_editor(ctx: click.Context, config: EditConfig | None = None, must_exist: bool = True):
    from .editor import SolaEditor
    from .models import load_model

    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep stderr for our own progress and errors
    transformers.utils.logging.set_verbosity_error()
    path = registry_path(ctx)
    if must_exist and not EditRegistry.exists(path):
        raise click.ClickException(f"no registry at {path}: create it with `sola init`")
    model, tokenizer = load_model(ctx.obj["model"], device=ctx.obj["device"] or "cpu")
    editor = SolaEditor.open(path, model, tokenizer, config=config, runtime=RuntimeConfig(device=ctx.obj["device"]))
    ctx.call_on_close(editor.close)
    return editor


def record_row(record) -> dict:
    return asdict(record)


@click.group(cls=SolaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", envvar="SOLA_REGISTRY", type=click.Path(), help="Registry directory [env SOLA_REGISTRY].")
@click.option("--model", envvar="SOLA_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model to edit: 'smollm2' (embedded) or a local transformers model directory [env SOLA_MODEL].")
@click.option("--device", default=None, help="torch device for the model, keys and adapters (default cpu).")
@click.pass_context
def cli(ctx: click.Context, registry: str | None, model: str, device: str | None) -> None:
    """Reversible lifelong model editing: one frozen LoRA adapter and routing key per edit."""
    ctx.obj = {"registry": registry, "model": model, "device": device}


@cli.command()
@click.option("--layers", help="Comma-separated module names to edit (default: one late MLP output projection).")
@click.option("--rank", type=int, default=EditConfig.rank, show_default=True)
@click.option("--alpha", type=float, default=EditConfig.alpha, show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default=EditConfig.metric, show_default=True)
@click.option("--threshold", type=float, default=EditConfig.threshold, show_default=True)
@click.pass_context
def init(ctx, layers, rank, alpha, metric, threshold):
    """Create an empty registry bound to --model."""
    if EditRegistry.exists(registry_path(ctx)):
        raise click.ClickException(f"a registry already exists at {registry_path(ctx)}")
    config = EditConfig(layers=layers.split(",") if layers else None, rank=rank, alpha=alpha,
                        metric=metric, threshold=threshold)
    editor = open_editor(ctx, config, must_exist=False)
    click.echo(f"created registry at {editor.registry.path} editing {', '.join(l.name for l in editor.registry.config.layers)}")


def read_jsonl(path: str) -> list[tuple[str, str]]:
    """All (prompt, target) pairs, checked before any edit is made: a bad line writes nothing."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                prompt, target = item["prompt"], item["target"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise click.ClickException(f"{path} line {n}: expected a JSON object with prompt and target ({e})")
            if not isinstance(prompt, str) or not isinstance(target, str) or not prompt.strip() or not target.strip():
                raise click.ClickException(f"{path} line {n}: prompt and target must be non-empty strings")
            pairs.append((prompt, target))
    return pairs


@cli.command()
@click.option("--prompt", help="The input to fix.")
@click.option("--target", help="What the model should continue it with (mind the leading space).")
@click.option("--file", "file_", type=click.Path(exists=True, dir_okay=False), help="JSONL of {prompt, target} lines.")
@click.option("--max-steps", type=int, default=TrainConfig.max_steps, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True)
@json_option
@click.pass_context
def edit(ctx, prompt, target, file_, max_steps, lr, as_json):
    """Fix one fact (--prompt/--target) or many (--file); creates the registry if needed."""
    if bool(file_) == bool(prompt is not None or target is not None):
        raise click.UsageError("give either --prompt and --target, or --file")
    pairs = read_jsonl(file_) if file_ else [(prompt or "", target or "")]
    train = TrainConfig(lr=lr, max_steps=max_steps)
    editor = open_editor(ctx, must_exist=False)
    rows = []
    with click.progressbar(pairs, label="editing", file=sys.stderr, hidden=len(pairs) < 2) as bar:
        for p, t in bar:
            rows.append(record_row(editor.registry.get(editor.edit(p, t, train))))
    for row in rows:
        if not row["info"].get("converged"):
            click.echo(f"warning: edit {row['id']} did not reach its target in {max_steps} steps", err=True)
    emit(rows, as_json, ["id", "status", "prompt", "target", "supersedes"])


@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@json_option
@click.pass_context
def generate(ctx, prompts, max_new_tokens, as_json):
    """Greedy continuations of PROMPTS from the edited model."""
    editor = open_editor(ctx)
    outputs = editor.generate(list(prompts), max_new_tokens=max_new_tokens)
    rows = [{"prompt": p, "edit": e, "output": o} for p, e, o in zip(prompts, editor.state.edit_ids.tolist(), outputs)]
    for row in rows:
        row["edit"] = None if row["edit"] < 0 else row["edit"]
        if not as_json:
            click.echo(f"{row['prompt']}{row['output']}")
    if as_json:
        emit(rows, True)


@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@json_option
@click.pass_context
def route(ctx, prompts, as_json):
    """Which edit (if any) fires for each of PROMPTS."""
    editor = open_editor(ctx)
    emit([{"prompt": p, "edit": e} for p, e in zip(prompts, editor.route(list(prompts)))], as_json)


@cli.command("list")
@click.option("--status", type=click.Choice(["active", "superseded", "rolled_back"]))
@click.option("--limit", type=int, default=None, help="Show at most this many edits.")
@json_option
@click.pass_context
def list_(ctx, status, limit, as_json):
    """List edits (no model is loaded)."""
    records = islice(open_registry(ctx, readonly=True).records(status), limit)
    rows = [record_row(r) for r in records]
    emit(rows, as_json, ["id", "status", "prompt", "target", "supersedes", "superseded_by"])


@cli.command()
@click.argument("edit_id", type=int)
@json_option
@click.pass_context
def show(ctx, edit_id, as_json):
    """Everything stored about one edit."""
    emit(record_row(open_registry(ctx, readonly=True).get(edit_id)), as_json)


@cli.command()
@click.argument("edit_id", type=int)
@json_option
@click.pass_context
def rollback(ctx, edit_id, as_json):
    """Take an edit out of routing (its previous version, if any, comes back)."""
    record = open_registry(ctx).rollback(edit_id)
    say(as_json, record_row(record), f"rolled back edit {record.id}")


@cli.command()
@click.argument("edit_id", type=int)
@json_option
@click.pass_context
def restore(ctx, edit_id, as_json):
    """Bring a rolled-back edit back into routing."""
    record = open_registry(ctx).restore(edit_id)
    say(as_json, record_row(record), f"restored edit {record.id}")


@cli.command()
@json_option
@click.pass_context
def stats(ctx, as_json):
    """Counts, settings and sizes of the registry."""
    emit(open_registry(ctx, readonly=True).stats(), as_json)


@cli.command()
@click.option("--repair", is_flag=True, help="Rebuild derived data; corrupt edits are rolled back, never deleted.")
@json_option
@click.pass_context
def verify(ctx, repair, as_json):
    """Check every edit's key, adapter and checksums, and that the index matches the store."""
    report = open_registry(ctx, readonly=not repair).verify(repair=repair)
    emit(asdict(report), as_json)
    if not report.ok and not repair:
        sys.exit(1)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--status", type=click.Choice(["active", "superseded", "rolled_back"]), default="active", show_default=True)
@click.pass_context
def export(ctx, file, status):
    """Write edits (records, keys, adapters) to one safetensors bundle FILE."""
    n = open_registry(ctx, readonly=True).export(file, status=status)
    click.echo(f"exported {n} edits to {file}")


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_context
def import_(ctx, file, as_json):
    """Add every edit of a bundle FILE (made for the same model) in one transaction."""
    ids = open_registry(ctx).import_(file)
    say(as_json, {"imported": ids}, f"imported {len(ids)} edits")


@cli.command()
@json_option
@click.pass_context
def demo(ctx, as_json):
    """The main job: counterfactual edits, paraphrase, neighbour and rollback on the embedded model."""
    from .demo import run_demo

    result = run_demo(ctx.obj["model"], echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result, indent=2))


def main() -> None:
    cli(prog_name="sola")
