"""Training edits' adapters against the frozen base model: many at once, each row with only its own edit's adapter."""
from __future__ import annotations

import itertools
import math
import time
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn
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
    block returned (for the rows now trained). Exact for a decoder that feeds each block's output to the next."""

    def __init__(self, block: nn.Module, frozen: "_Frozen") -> None:
        super().__init__()
        self.block, self.frozen = block, frozen

    def forward(self, *args, **kwargs):
        return self.frozen.current

    def __getattr__(self, name: str):  # models read attributes of their blocks (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


class _Reached(Exception):
    """Ends a capturing forward at the last replayed block."""


class _Frozen:
    """What blocks[:below] output for each row of a batch, computed once when the row's edit joins the training
    (`add`), kept while it trains (`drop`), and handed to the blocks above (`select`)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, below: int, batch: "_Batch",
                 compute: Callable[[], object]) -> None:
        self.model, self.blocks, self.below, self.batch, self.compute = model, blocks, below, batch, compute
        self.originals = [blocks[i] for i in range(below)]
        self.rows: dict[int, tuple] = {}  # batch row -> its outputs' tensors, cut to its length
        self.form = None  # the block's output (a tensor, or a tuple with _ROW where the rows' tensors go)
        self.current = None

    def add(self, rows: list[int]) -> None:
        """One forward (or two, split by length like a training step's) of blocks[:below] over `rows`."""
        captured = {}

        def stop(module, args, out):
            captured["out"] = out
            raise _Reached  # the blocks above (and the head over every position) are not needed

        self.restore()
        hook = self.originals[-1].register_forward_hook(stop)
        try:
            for part in _by_length(rows, self.batch.lengths):
                length = self.batch.lengths[part[0]]
                try:
                    with torch.no_grad(), self.compute():
                        self.model(**self.batch.inputs(torch.tensor(part, device=self.batch.ids.device), length))
                except _Reached:
                    pass
                out = captured.pop("out")
                parts = (out,) if isinstance(out, torch.Tensor) else tuple(out)
                if self.form is None:
                    self.form = out if isinstance(out, torch.Tensor) else tuple(
                        _ROW if _per_row(t, len(part), length) else t for t in out)
                for k, row in enumerate(part):
                    n = self.batch.lengths[row]
                    self.rows[row] = tuple(t[k, :n] for t in parts if _per_row(t, len(part), length))
        finally:
            hook.remove()
            self.replay()

    def drop(self, rows: list[int]) -> None:
        for row in rows:
            del self.rows[row]

    def select(self, rows: list[int]) -> None:
        """The forwards that follow are given those rows, right-padded to the longest (exact: with causal attention
        no real position depends on a later one)."""
        padded = [nn.utils.rnn.pad_sequence([self.rows[r][i] for r in rows], batch_first=True)
                  for i in range(len(self.rows[rows[0]]))]
        if isinstance(self.form, torch.Tensor):
            self.current = padded[0]
        else:
            filled = iter(padded)
            self.current = type(self.form)(next(filled) if t is _ROW else t for t in self.form)

    def replay(self) -> None:
        """blocks[:below] give what `select` chose."""
        for i, block in enumerate(self.originals):
            self.blocks[i] = _Replay(block, self)

    def restore(self) -> None:
        for i, block in enumerate(self.originals):
            self.blocks[i] = block


_ROW = object()


def _per_row(t, rows: int, length: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (rows, length)


@contextmanager
def replaying(model: nn.Module, blocks: nn.ModuleList, below: int, batch: "_Batch",
              compute: Callable[[], object]) -> Iterator[_Frozen]:
    """Nothing below the first edited layer changes while adapters train, so blocks[:below] run once per row
    (`_Frozen.add`, inside `compute()`, the training forwards' autocast) and then replay: each step computes only
    the blocks from the edited one up (on SmolLM2, 6 of 30)."""
    frozen = _Frozen(model, blocks, below, batch, compute)
    frozen.replay()
    try:
        yield frozen
    finally:
        frozen.restore()


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
        self.targets = self.ids[self.rows, self.positions + 1]  # (N,)
        self.lengths = [n - 1 for n in lengths]  # what the forwards read: a row's last token predicts nothing
        self.first = [0, *itertools.accumulate(len(group) for group in groups)]  # each group's first row

    def rows_of(self, groups: list[int]) -> list[int]:
        return [row for g in groups for row in range(self.first[g], self.first[g + 1])]

    def inputs(self, rows: torch.Tensor, length: int) -> dict:
        return {"input_ids": self.ids[rows, :length], "attention_mask": self.mask[rows, :length], "use_cache": False}


def fit(model: nn.Module, groups: list[list[Example]], params: list[torch.Tensor], cfg: TrainConfig,
        frozen: tuple[nn.ModuleList, int] | None = None, *, init: list[torch.Tensor] | None = None,
        select: Callable[[torch.Tensor], None] | None = None,
        done: Callable[[int, int, dict], None] | None = None) -> None:
    """Adam on `params` until every example of a group predicts its target after its prompt, for many groups at
    once. With `init`, `params` are stacked per slot (each (slots, ...)); a group trains in a slot that starts from
    `init` with its own Adam state, and the caller makes each row use its own slot's parameters (`select(slots)` is
    called with the slot of each row before the forwards that follow), so a group trains exactly as it would alone.
    Each group's loss is its own mean. A finished group leaves, `done(g, slot, info)` is called while its slot holds
    its parameters as it finished, and the next group takes the slot: the batch stays full until the groups run
    out, instead of waiting on its slowest group. Without `init`, `params` are the one group's, trained from what
    they hold (the bench's baselines train their own shared weights so). With `frozen` = (blocks, i), blocks[:i]
    are replayed.

    Teacher-forced argmax equal to the target at every target position means greedy generation produces
    exactly the target, so a group stops as soon as that holds for each of its examples with `cfg.margin` to spare.
    In bfloat16 (`compute_dtype`, which each info names) every forward (the replayed blocks' too, and so the
    margins) runs in bfloat16 (`computing`); the parameters stay float32.
    """
    if init is None and len(groups) != 1:
        raise ValueError(f"parameters not stacked per slot train one group, not {len(groups)}")
    batch = _Batch(groups)
    where = {"rows": batch.rows, "positions": batch.positions}
    dtype = compute_dtype(cfg, batch.ids.device)
    slots = 1 if init is None else params[0].shape[0]
    with ExitStack() as stack:
        compute = stack.enter_context(computing(model, dtype, batch.ids.device))
        replay = stack.enter_context(replaying(model, *frozen, batch, compute)) \
            if frozen and frozen[1] > 0 else None
        stack.enter_context(targets_only(model, where))
        adam = _Adam(params, cfg.lr, stacked=init is not None)
        waiting, free, active, shown = list(range(len(groups)))[::-1], list(range(slots))[::-1], [], None
        slot_of, steps, start = torch.zeros(len(groups), dtype=torch.long), [0] * len(groups), [0.0] * len(groups)
        while waiting or active:
            joining = []
            while free and waiting:  # waiting groups take the free slots, in order
                g, slot = waiting.pop(), free.pop()
                if init is not None:
                    adam.restart(slot, init)
                slot_of[g], start[g] = slot, time.perf_counter()
                joining.append(g)
            if joining:
                active += joining  # still ascending: groups join in order
                if replay is not None and any(row not in replay.rows for row in batch.rows_of(joining)):
                    # these and the next `slots` waiting groups in one forward: a few rows at a time cost
                    # the lower blocks' fixed overhead at nearly every step
                    replay.add([row for row in batch.rows_of(joining + waiting[::-1][:slots])
                                if row not in replay.rows])
            if active != shown:  # the batch as it now is: the rows of the groups still training
                chunks, targets, group = _chunks(batch, active)
                shown = list(active)
            with compute():
                logits = torch.cat([_forward(model, batch, chunk, where, replay, select, slot_of)
                                    for chunk in chunks])
            margins, losses = _losses(logits, targets, group, len(active), cfg.loss_margin)
            finished = [k for k, m in enumerate(margins) if m >= cfg.margin or steps[active[k]] >= cfg.max_steps]
            for k in finished:
                g, m = active[k], margins[k]
                if done is not None:
                    done(g, int(slot_of[g]), {
                        "steps": steps[g], "loss": losses[k].item(), "margin": m, "converged": m > 0,
                        "stopped_short": m < cfg.margin, "examples": len(groups[g]), "dtype": dtype,
                        "seconds": round(time.perf_counter() - start[g], 4)})
                free.append(int(slot_of[g]))
            training = [k for k in range(len(active)) if k not in finished]
            if training:
                for p in params:
                    p.grad = None
                losses[training].sum().backward(inputs=params)
                adam.step(slot_of[[active[k] for k in training]])
                for k in training:
                    steps[active[k]] += 1
            if finished:
                if replay is not None:
                    replay.drop(batch.rows_of([active[k] for k in finished]))
                active = [active[k] for k in training]


class _Adam:
    """torch.optim.Adam's update (no weight decay) on parameters stacked per slot, each slot with its own moments
    and step count: a slot restarts when the next group takes it, and only the slots still training step.
    Unstacked parameters are one slot."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, stacked: bool = True) -> None:
        self.params, self.lr, self.betas, self.eps, self.stacked = params, lr, betas, eps, stacked
        self.m = [torch.zeros_like(self._slots(p)) for p in params]
        self.v = [torch.zeros_like(self._slots(p)) for p in params]
        self.t = torch.zeros(self.m[0].shape[0], dtype=torch.float64)

    def _slots(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.stacked else t.unsqueeze(0)

    def restart(self, slot: int, init: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, m, v, p0 in zip(self.params, self.m, self.v, init):
                self._slots(p)[slot], m[slot], v[slot] = p0, 0, 0
        self.t[slot] = 0

    @torch.no_grad()
    def step(self, slots: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t[slots] += 1
        t = self.t[slots]
        root = (1 - b2 ** t).sqrt().float().to(self.params[0].device)
        step_size = (self.lr / (1 - b1 ** t)).float().to(self.params[0].device)
        slots = slots.to(self.params[0].device)
        for param, m, v in zip(self.params, self.m, self.v):
            p, g = self._slots(param), self._slots(param.grad)[slots]
            shape = (-1,) + (1,) * (p.dim() - 1)
            m[slots] = mm = m[slots].lerp_(g, 1 - b1)
            v[slots] = vv = v[slots].mul_(b2).addcmul_(g, g, value=1 - b2)
            p[slots] = p[slots] - step_size.view(shape) * mm / (vv.sqrt() / root.view(shape) + self.eps)


Chunk = tuple[list[int], int, torch.Tensor]  # batch rows, the length they are cut to, their target tokens


SPLIT_TOKENS = 256  # a second forward per step costs about as much as this many more padded tokens (SmolLM2, CPU)


def _by_length(rows: list[int], lengths: list[int]) -> list[list[int]]:
    """`rows`, longest first, in one forward or in two (the longest rows, then the rest) where that saves more
    than SPLIT_TOKENS of padding: in a batch, bare prompts need not be padded to the length of chat-templated
    ones, while a single edit's two rows stay in one forward."""
    rows = sorted(rows, key=lambda i: -lengths[i])
    sizes = [lengths[i] for i in rows]
    cost = lambda k: k * sizes[0] + (len(rows) - k) * sizes[k] + SPLIT_TOKENS  # noqa: E731  split before row k
    split = min(range(1, len(rows)), key=cost, default=None)
    return [rows] if split is None or cost(split) >= len(rows) * sizes[0] else [rows[:split], rows[split:]]


def _chunks(batch: _Batch, active: list[int]) -> tuple[list[Chunk], torch.Tensor, torch.Tensor]:
    """The rows of the `active` groups (ascending), split by length (`_by_length`), and every target token in
    chunk order and its group (position in `active`)."""
    chunks = []
    for part in _by_length(batch.rows_of(active), batch.lengths):
        tokens = torch.isin(batch.rows, torch.tensor(part, device=batch.rows.device)).nonzero().flatten()
        chunks.append((part, batch.lengths[part[0]], tokens))  # its target tokens, in batch order
    tokens = torch.cat([t for _, _, t in chunks])
    group = torch.searchsorted(torch.tensor(active, device=tokens.device), batch.owner[batch.rows[tokens]])
    return chunks, batch.targets[tokens], group


def _forward(model, batch: _Batch, chunk: Chunk, where: dict, replay: _Frozen | None, select,
             slot_of: torch.Tensor) -> torch.Tensor:
    """(n, vocab) logits of one chunk's target tokens: the head, the replayed blocks and the adapters (`select`:
    each row's slot) all see only its rows."""
    part, length, tokens = chunk
    members = torch.tensor(part, device=batch.owner.device)
    local = torch.full_like(batch.owner, -1)
    local[members] = torch.arange(len(members), device=members.device)  # batch row -> row of this forward
    where["rows"], where["positions"] = local[batch.rows[tokens]], batch.positions[tokens]
    if replay is not None:
        replay.select(part)
    if select is not None:
        select(slot_of[batch.owner[members].cpu()].to(members.device))
    logits = model(**batch.inputs(members, length)).logits  # (n, vocab) where targets_only took hold
    return (logits if logits.dim() == 2 else logits[where["rows"], where["positions"]]).float()


def _losses(logits: torch.Tensor, targets: torch.Tensor, group: torch.Tensor, count: int,
            lowered: float) -> tuple[list[float], torch.Tensor]:
    """Each group's margin (the smallest lead of one of its target tokens' logit over the best other token; > 0:
    greedy decoding yields its targets) and its mean cross-entropy over its target tokens, each target's logit
    first lowered by `lowered` (an additive-margin softmax): plain cross-entropy fades once a token is likely,
    and then left the last tokens short of the stopping margin to crawl up, while the loss stays alive until every
    target leads by about `lowered`."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (N,)
    top2 = logits.detach().topk(2, dim=1)
    others = torch.where(top2.indices[:, 0] == targets, top2.values[:, 1], top2.values[:, 0])
    margins = torch.full((count,), float("inf")).scatter_reduce(0, group.cpu(), (picked.detach() - others).cpu(),
                                                              "amin")
    # cross-entropy with the target's logit t lowered, in closed form over the logits' logsumexp s (no second
    # (N, vocab) tensor): log(exp(s) - exp(t) + exp(t - lowered)) - (t - lowered), the log's argument >= exp(-lowered)
    total = logits.logsumexp(dim=1)
    share = torch.exp(picked - total) * math.expm1(-lowered)  # in (-1, 0]
    token_loss = total + torch.log1p(share) - (picked - lowered)  # (N,)
    sums = torch.zeros(count, device=logits.device).index_add(0, group, token_loss)
    counts = torch.zeros(count, device=logits.device).index_add(0, group, torch.ones_like(token_loss))
    return margins.tolist(), sums / counts


def train_adapters(model: nn.Module, state: RoutingState, shapes: list[tuple[int, int]],
                   groups: list[list[Example]], rank: int, alpha: float, cfg: TrainConfig,
                   frozen: tuple[nn.ModuleList, int] | None = None, *, slots: int | None = None,
                   done: Callable[[int, dict[str, torch.Tensor], dict], None] | None = None
                   ) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """A fresh adapter per group of examples (one edit's), `slots` of them (default: all) trained at once: each
    forced on its own rows only (earlier edits are not routed), starting from the same initial adapter and stopping
    by its own margin, so each comes out as it would trained alone. Frozen, on the CPU, and handed to
    `done(g, adapter, info)` as each finishes; also returned, in order."""
    device = groups[0][0][0].device
    slots = min(slots or len(groups), len(groups))
    init = [t.detach() for pair in new_adapter(shapes, rank, cfg.seed, device) for t in pair]  # A0, B0, A1, ...
    params = [nn.Parameter(t.expand(slots, *t.shape).clone()) for t in init]  # (slots, r, in), (slots, out, r)
    results: list = [None] * len(groups)

    def keep(g: int, slot: int, info: dict) -> None:
        adapter = {}
        for i in range(len(shapes)):
            for name, p in zip(adapter_names(i), params[2 * i:2 * i + 2]):
                adapter[name] = p[slot].detach().float().cpu().clone()
        results[g] = (adapter, info)
        if done is not None:
            done(g, adapter, info)

    with state.forcing(list(zip(params[0::2], params[1::2])), alpha / rank):
        fit(model, groups, params, cfg, frozen, init=init, select=lambda rows: setattr(state, "forced_rows", rows),
            done=keep)
    return results
