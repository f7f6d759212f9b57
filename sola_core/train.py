"""Training edits' adapters against the frozen base model: many at once, each row with only its own edit's adapter."""
from __future__ import annotations

import math
import time
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.pytorch_utils import Conv1D

from registry.types import adapter_names

from .config import TrainConfig
from .keys import native_bf16
from .routing import RoutingState


def new_adapter(shapes: list[tuple[int, int]], rank: int, seed: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hu et al.'s LoRA init: A random, B zero, so the untrained adapter changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for in_f, out_f in shapes:
        bound = 1.0 / math.sqrt(in_f)
        A = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound  # (r, in)
        B = torch.zeros(out_f, rank)  # (out, r)
        params.append((nn.Parameter(A.to(device)), nn.Parameter(B.to(device))))
    return params


Example = tuple[torch.Tensor, int]  # (1, T) token ids, prompt then target; how many of them are the target


class _Replay(nn.Module):
    """Stands in for a block whose input is the same at every training step: returns what the last replayed
    block returned once (for the rows now trained). Exact for a decoder that feeds each block's output to the next."""

    def __init__(self, block: nn.Module, rows: "_Rows") -> None:
        super().__init__()
        self.block, self.rows = block, rows

    def forward(self, *args, **kwargs):
        return self.rows.current

    def __getattr__(self, name: str):  # models read attributes of their blocks (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


class _Rows:
    """A block output (a tensor, or a tuple of them) and its rows for the forwards to come."""

    def __init__(self, output) -> None:
        self.output = self.current = output
        self.batch, self.length = (output if isinstance(output, torch.Tensor) else output[0]).shape[:2]

    def select(self, rows: torch.Tensor, length: int) -> None:
        """Those rows, cut to their first `length` positions (exact: with right padding and causal attention, no
        real position depends on a later one)."""
        def take(t):
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != self.batch:
                return t
            return t[rows, :length] if t.shape[1] == self.length else t[rows]
        self.current = take(self.output) if isinstance(self.output, torch.Tensor) else \
            type(self.output)(take(t) for t in self.output)


class _Reached(Exception):
    """Ends the replayed blocks' one forward at the last of them."""


@contextmanager
def replaying(model: nn.Module, blocks: nn.ModuleList, below: int, inputs: dict,
              compute: Callable[[], object]) -> Iterator[Callable]:
    """Nothing below the first edited layer changes while adapters train, so blocks[:below] run once on `inputs`
    (inside `compute()`, the training forwards' autocast) and then replay: each step computes only the blocks
    from the edited one up (on SmolLM2, 6 of 30). Yields `select(rows, length)`: the forwards that follow are
    given only those rows of `inputs`, that long."""
    captured = {}

    def stop(module, args, out):
        captured["out"] = out
        raise _Reached  # the blocks above (and the head over every position) are not needed

    hook = blocks[below - 1].register_forward_hook(stop)
    try:
        with torch.no_grad(), compute():
            model(**inputs)
    except _Reached:
        pass
    finally:
        hook.remove()
    rows = _Rows(captured["out"])
    originals = [blocks[i] for i in range(below)]
    for i in range(below):
        blocks[i] = _Replay(originals[i], rows)
    try:
        yield rows.select
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@contextmanager
def targets_only(model: nn.Module, where: dict) -> Iterator[None]:
    """The output head sees only the hidden states that predict a target token (`where["rows"]`,
    `where["positions"]`): (N, vocab) logits instead of (batch, length, vocab). On SmolLM2 (49k-token vocabulary)
    the head was a third of each training step."""
    head = model.get_output_embeddings()
    hook = None if head is None else head.register_forward_pre_hook(
        lambda m, args: (args[0][where["rows"], where["positions"]], *args[1:]))
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


@contextmanager
def weights_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The frozen model's matmul weights (linears, GPT-2's Conv1D, the output head) in `dtype` for the whole fit,
    then the very float32 tensors back. Autocast would cast each frozen weight again at every call (it keeps casts
    of trainable weights only), which cost SmolLM2 about a tenth of its bfloat16 edits/s. Norms and biases stay as
    they are, so each op computes as under autocast alone, but for one: where the head is tied to the input
    embeddings (SmolLM2), the embedding lookup gives bfloat16 too. Meanwhile the model serves nothing else (as
    with the routing state's forcing: training and serving take turns, the server's worker runs edits between
    steps)."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))}
    head = model.get_output_embeddings()
    if head is not None:
        weights[id(head.weight)] = head.weight  # tied to the input embeddings on many models: cast once
    kept = [(w, w.data) for w in weights.values() if w.dtype == torch.float32]
    try:
        for w, data in kept:
            w.data = _cast(w, data, dtype)
        yield
    finally:
        for w, data in kept:
            w.data = data


_CASTS: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}  # id(weight) -> (weight, what it held, its cast)


def _cast(weight: nn.Parameter, data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`data` in `dtype`, kept from one fit to the next while the weight holds the same tensor, unchanged since
    (its version counts in-place writes to the parameter, `load_state_dict` included; the registry's edits are
    bound to the base weights anyway, `fingerprint.py`): casting SmolLM2 took ~70 ms of a 0.7 s edit. Costs the
    cast copies' memory (270 MB in bfloat16 for SmolLM2)."""
    held = (data.data_ptr(), weight._version, dtype)
    ref, was, cast = _CASTS.get(id(weight), (None, None, None))
    if ref is None or ref() is not weight or was != held:
        cast = data.to(dtype)
        _CASTS[id(weight)] = (weakref.ref(weight, lambda _, key=id(weight): _CASTS.pop(key, None)), held, cast)
    return cast


def compute_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """What `cfg.dtype` means on `device`: "auto" is bfloat16 where it runs in hardware (`keys.native_bf16`)."""
    return cfg.dtype if cfg.dtype != "auto" else "bfloat16" if native_bf16(device) else "float32"


@contextmanager
def computing(model: nn.Module, dtype: str, device: torch.device) -> Iterator[Callable]:
    """The training forwards' precision (`compute_dtype`). Yields what each forward runs inside: bfloat16 autocast
    over weights cast once (`weights_in`), and on the CPU the plain-math attention (its backward in bfloat16 is
    several times faster there than the fused kernel's); in float32 nothing changes."""
    if dtype != "bfloat16":
        yield nullcontext
        return
    with ExitStack() as stack:
        stack.enter_context(weights_in(model, torch.bfloat16))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class _Batch:
    """The examples of several groups, right-padded in one batch (each row keeps its own positions), and which
    group each row and each target token belongs to."""

    def __init__(self, groups: list[list[Example]]) -> None:
        examples = [ex for group in groups for ex in group]
        device = examples[0][0].device
        lengths = [ids.shape[1] for ids, _ in examples]
        self.ids = torch.zeros(len(examples), max(lengths), dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        self.owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)  # per row
        rows, positions = [], []
        for i, ((ids, n), length) in enumerate(zip(examples, lengths)):
            self.ids[i, :length], self.mask[i, :length] = ids[0], 1
            rows += [i] * n
            positions += range(length - n - 1, length - 1)  # each target token is predicted one position earlier
        self.rows, self.positions = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
        self.lengths = lengths
        self.targets = self.ids[self.rows, self.positions + 1]  # (N,)

    def inputs(self, rows: torch.Tensor | None = None, length: int | None = None) -> dict:
        ids, mask = (self.ids, self.mask) if rows is None else (self.ids[rows, :length], self.mask[rows, :length])
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def fit(model: nn.Module, groups: list[list[Example]], params: list[torch.Tensor], cfg: TrainConfig,
        frozen: tuple[nn.ModuleList, int] | None = None, *, select: Callable[[torch.Tensor], None] | None = None,
        done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Adam on `params` until every example of a group predicts its target after its prompt, for every group at
    once. Each group's loss is its own mean, and the caller makes each group train its own parameters
    (`select(owner)` is called with the group of each row before the forwards that follow), so a group trains
    exactly as it would alone; a finished group leaves the batch and `done(g, info)` is called while its
    parameters are as it finished them. With `frozen` = (blocks, i), blocks[:i] are replayed (`replaying`).

    Teacher-forced argmax equal to the target at every target position means greedy generation produces
    exactly the target, so a group stops as soon as that holds for each of its examples with `cfg.margin` to spare.
    In bfloat16 (`compute_dtype`, which each info names) every forward (the replayed blocks' one too, and so the
    margins) runs in bfloat16 (`computing`); the parameters stay float32.
    """
    batch = _Batch(groups)
    where = {"rows": batch.rows, "positions": batch.positions}
    infos: list[dict] = [{} for _ in groups]
    start = time.perf_counter()
    dtype = compute_dtype(cfg, batch.ids.device)
    with ExitStack() as stack:
        compute = stack.enter_context(computing(model, dtype, batch.ids.device))
        take = stack.enter_context(replaying(model, *frozen, batch.inputs(), compute)) \
            if frozen and frozen[1] > 0 else None
        stack.enter_context(targets_only(model, where))
        opt = torch.optim.Adam(params, lr=cfg.lr)
        active, steps, shown = list(range(len(groups))), 0, None
        while active:
            if active != shown:  # the batch as it now is: the rows of the groups still training
                chunks, targets, group = _chunks(batch, active)
                shown = list(active)
            with compute():
                logits = torch.cat([_forward(model, batch, chunk, where, take, select) for chunk in chunks])
            margins, losses = _losses(logits, targets, group, len(active), cfg.loss_margin)
            finished = [k for k, m in enumerate(margins) if m >= cfg.margin or steps >= cfg.max_steps]
            for k in finished:
                g, m = active[k], margins[k]
                infos[g] = {"steps": steps, "loss": losses[k].item(), "margin": m, "converged": m > 0,
                            "stopped_short": m < cfg.margin, "examples": len(groups[g]), "dtype": dtype,
                            "seconds": round(time.perf_counter() - start, 4)}
                if done is not None:
                    done(g, infos[g])
            if len(finished) == len(active):
                break
            opt.zero_grad()
            losses[[k for k in range(len(active)) if k not in finished]].sum().backward(inputs=params)
            opt.step()  # elementwise: a finished group's parameters may drift now, but it was kept in `done`
            steps += 1
            active = [g for k, g in enumerate(active) if k not in finished]
    return infos


Chunk = tuple[torch.Tensor, int, torch.Tensor]  # batch rows, the length they are cut to, their target tokens


SPLIT_TOKENS = 256  # a second forward per step costs about as much as this many more padded tokens (SmolLM2, CPU)


def _chunks(batch: _Batch, active: list[int]) -> tuple[list[Chunk], torch.Tensor, torch.Tensor]:
    """The rows of the `active` groups in one forward, or in two (the longest rows, then the rest) where that saves
    more than SPLIT_TOKENS of padding: in a batch, bare prompts need not be padded to the length of chat-templated
    ones, while a single edit's two rows stay in one forward. Also every target token in chunk order and its
    group (position in `active`)."""
    member = set(active)
    rows = sorted((i for i, g in enumerate(batch.owner.tolist()) if g in member), key=lambda i: -batch.lengths[i])
    lengths = [batch.lengths[i] for i in rows]
    cost = lambda k: k * lengths[0] + (len(rows) - k) * lengths[k] + SPLIT_TOKENS  # noqa: E731  split before row k
    split = min(range(1, len(rows)), key=cost, default=None)
    parts = [rows] if split is None or cost(split) >= len(rows) * lengths[0] else [rows[:split], rows[split:]]
    chunks = []
    for part in parts:
        members = torch.tensor(part, device=batch.owner.device)
        tokens = torch.isin(batch.rows, members).nonzero().flatten()  # its target tokens, in batch order
        chunks.append((members, batch.lengths[part[0]], tokens))
    tokens = torch.cat([t for _, _, t in chunks])
    group = torch.searchsorted(torch.tensor(active, device=tokens.device), batch.owner[batch.rows[tokens]])
    return chunks, batch.targets[tokens], group


def _forward(model, batch: _Batch, chunk: Chunk, where: dict, take, select) -> torch.Tensor:
    """(n, vocab) logits of one chunk's target tokens: the head, the replayed blocks and the adapters (`select`:
    each row's) all see only its rows."""
    members, length, tokens = chunk
    local = torch.full_like(batch.owner, -1)
    local[members] = torch.arange(len(members), device=members.device)  # batch row -> row of this forward
    where["rows"], where["positions"] = local[batch.rows[tokens]], batch.positions[tokens]
    if take is not None:
        take(members, length)
    if select is not None:
        select(batch.owner[members])
    logits = model(**batch.inputs(members, length)).logits  # (n, vocab) where targets_only took hold
    return (logits if logits.dim() == 2 else logits[where["rows"], where["positions"]]).float()


def _losses(logits: torch.Tensor, targets: torch.Tensor, group: torch.Tensor, count: int,
            lowered: float) -> tuple[list[float], torch.Tensor]:
    """Each group's margin (the smallest lead of one of its target tokens' logit over the best other token; > 0:
    greedy decoding yields its targets) and its mean cross-entropy over its target tokens, each target's logit
    first lowered by `lowered` (an additive-margin softmax): plain cross-entropy fades once a token is likely,
    and then left the last tokens short of the stopping margin to crawl up, while the loss stays alive until every
    target leads by about `lowered`."""
    detached = logits.detach()
    picked = detached.gather(1, targets[:, None]).squeeze(1)
    others = detached.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    margins = torch.full((count,), float("inf")).scatter_reduce(0, group.cpu(), (picked - others).cpu(), "amin")
    if lowered:
        logits = logits.scatter_add(1, targets[:, None], logits.new_full((len(targets), 1), -lowered))
    token_loss = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    sums = torch.zeros(count, device=logits.device).index_add(0, group, token_loss)
    counts = torch.zeros(count, device=logits.device).index_add(0, group, torch.ones_like(token_loss))
    return margins.tolist(), sums / counts


def train_adapters(model: nn.Module, state: RoutingState, shapes: list[tuple[int, int]],
                   groups: list[list[Example]], rank: int, alpha: float, cfg: TrainConfig,
                   frozen: tuple[nn.ModuleList, int] | None = None) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """A fresh adapter per group of examples (one edit's), all trained in one batch: each forced on its own rows
    only (earlier edits are not routed), starting from the same initial adapter and stopping by its own margin,
    so each comes out as it would trained alone. Then frozen, on the CPU."""
    device = groups[0][0][0].device
    params = [(nn.Parameter(A.detach().expand(len(groups), *A.shape).clone()),
               nn.Parameter(B.detach().expand(len(groups), *B.shape).clone()))
              for A, B in new_adapter(shapes, rank, cfg.seed, device)]  # (G, r, in), (G, out, r)
    adapters: list[dict[str, torch.Tensor]] = [{} for _ in groups]

    def keep(g: int, info: dict) -> None:
        for i, (A, B) in enumerate(params):
            a, b = adapter_names(i)
            adapters[g][a], adapters[g][b] = A[g].detach().float().cpu().clone(), B[g].detach().float().cpu().clone()

    with state.forcing(params, alpha / rank):
        infos = fit(model, groups, [p for pair in params for p in pair], cfg, frozen,
                    select=lambda owner: setattr(state, "forced_rows", owner), done=keep)
    return list(zip(adapters, infos))
