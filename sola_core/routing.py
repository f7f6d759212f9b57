"""Which edit each row of a batch gets: decided once per sequence, on its prompt pass, and kept for its decode steps.

Three parts, each small:
- `RoutingState`, the decision every edited layer reads (only the router writes it, through its methods);
- `PromptPasses`, which tells a sequence's prompt pass from its decode steps using only what every transformers
  release gives: `generate` itself, the tokens and attention mask of each forward, and any cache object passed
  (whatever its keyword), never one keyword's name;
- `Router`, which on a prompt pass computes each row's query, finds its edit (nearest active key within the
  threshold, tombstones respected, corrupt edits dropped) and resolves the adapters through the device cache.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from registry import AdapterCache, EditRegistry
from registry.errors import CorruptEdit

from .generation import with_positions
from .config import NAMED_RADIUS, NEARBY, RELATION_RADIUS
from .keys import (KeySource, Mentions, as_it, asked_parts, asked_kinds, asks, name_runs, names, overlap,
                   refilled, undescribed, within, words)

log = logging.getLogger(__name__)

Adapter = list[tuple[torch.Tensor, torch.Tensor]]  # (A, B) per edited layer


@dataclass(frozen=True)
class _Read:
    """What routing needs of an edit's text, read once (an edit's text never changes)."""

    phrasings: list[str]  # its prompt and paraphrases
    names: frozenset[str]  # `keys.names` of its phrasings, opening words included
    subject: frozenset[str]  # its subject's words, if it was given one
    runs: tuple[frozenset[str], ...]  # its names as `keys.name_runs` groups them
    said: frozenset[str]  # every word of its phrasings
    asked: frozenset[str]  # what its phrasings ask of what they name (`keys.asks`): the relation's words
    kinds: frozenset[str]  # the answer kinds its phrasings ask for (`keys.asked_kinds`; "place" or "thing" read as
    # its target says); "number" for a digit in its target, "thing" for one without a capital where they say none


class EditMentions:
    """What an edit is about and what it asks, read once per edit (an edit's text never changes): the names its
    phrasings give (`keys.names` of its prompt and paraphrases, opening words included), its subject's words if
    it has one, and the phrasings themselves. Called with what a query mentions, says whether the query asks the
    edit's question: it names what the edit names (or says all of its subject), and, with those words read as
    "it", asks the same of it (`asks_the_same`). Another relation of the same subject ("The capital of Romania
    is" beside an edit of "Romania is located on the continent of") names it too, and asks something else.
    `names_another` says whether a query's names contradict the edit's (another subject), `asks_another_kind` whether
    it asks for another kind of answer (a year of an edit answering with a name, a place of one asking who).

    An edit that names nothing and has no subject ("The inventor of the revolver is") is about the words a query
    shares with it but not with the other edits nearest the query (`nearby`): those are the relation's ("inventor",
    "symbol"), the rest the subject's ("revolver"). So is an edit to a query that names nothing, its first word
    included ("Who discovered penicillin?" beside "Penicillin was discovered by", named by its opening word only).
    A named edit also takes a query that asks with a word the nearby named edits of its relation ask theirs with
    (`_lent`). A query that is one of its phrasings with one run of words put in place of another ("Which animal
    class includes the crab?" beside "... the scorpion?") asks the same of something else (`keys.refilled`).

    `embed` (the encoder key source's) compares what is asked by embedding; without it only a shared word does."""

    def __init__(self, registry: EditRegistry, embed: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        self.registry, self.embed = registry, embed
        self._known: dict[int, _Read] = {}

    def _read(self, edit_id: int) -> _Read:
        if edit_id not in self._known:
            record = self.registry.get(edit_id)
            phrasings = [record.prompt, *record.paraphrases]
            runs = tuple(run for t in phrasings for run in name_runs(t, openings=True))
            names = frozenset().union(*runs)
            common_noun = any(c.islower() for c in record.target) and not any(c.isupper() for c in record.target)
            kinds: set[str] = set()
            for phrasing in phrasings:
                asked = asked_kinds(phrasing)
                if asked == {"place", "thing"}:  # "built a career in": the answer says which ("tennis", "Paris")
                    asked = {"thing" if common_noun else "place"}
                kinds |= asked
            if any(c.isdigit() for c in record.target):
                kinds.add("number")
            elif not kinds and common_noun:
                kinds.add("thing")  # all lower case: a common noun ("piano"), nobody's name; no case says nothing
            self._known[edit_id] = _Read(
                phrasings, names, words(record.subject or ""), runs,
                said=frozenset().union(*map(words, phrasings)),
                asked=frozenset().union(*(asks(phrasing, names) for phrasing in phrasings)), kinds=frozenset(kinds))
        return self._known[edit_id]

    def names_another(self, edit_id: int, query: Mentions) -> bool:
        """Whether the query is about someone or something else than the edit, by the names both give: none of
        the query's names is one the edit names ("Niger" beside an edit of "Nigeria"), or one of its names shares
        words with the edit's names but is neither a part of one of them nor takes one in ("South Korea" beside
        "North Korea", "U.S. Virgin Islands" beside "British Virgin Islands"). A shorter form of the edit's name
        ("Einstein" for "Albert Einstein"), a longer one ("Sir Isaac Newton") or a one-letter misspelling
        ("Crockett" for "Crocket") may be the same subject, and is not turned away. Close embeddings do not tell
        these apart; names do."""
        runs = self._read(edit_id).runs
        if not query.runs or not runs:
            return False
        touching = [(q, [e for e in runs if overlap(q, e)]) for q in query.runs]
        touching = [(q, es) for q, es in touching if es]
        if not touching:
            return True
        return any(not any(within(q, e) or within(e, q) for e in es) for q, es in touching)

    def asks_another_kind(self, edit_id: int, query: Mentions) -> bool:
        """Whether the query asks for another kind of answer than the edit (`keys.asked_kinds`): a year or an amount
        of an edit that answers with neither ("When was The Magic Flute first performed?" beside the edit of its
        composer: the same subject and most of the words, however near the two embed); who of an edit that asks
        where or answers with a thing ("Who taught Jimi Hendrix music?" beside the edit of his instrument, whose
        answer, all lower case, is nobody's name); a place or a thing of one that asks who ("In which country was
        penicillin discovered?" beside "Penicillin was discovered by", "Which album features Thriller?" beside the
        edit of who recorded it). A name is what an edit answers unless its wording or its answer says otherwise;
        the kinds of answer the query or the edit leave unsaid turn nothing away. A sentence left open at "in" asks a
        place or a thing ("built a career in") and turns away only an edit answering with neither; "Where did Jimi
        Hendrix play?" asks a place, and turns away the edit of his instrument."""
        asked, kinds = asked_kinds(query.text), self._read(edit_id).kinds
        if "number" in asked:
            return "number" not in kinds
        return bool(asked and kinds) and not asked & kinds

    def __call__(self, edit_id: int, query: Mentions, nearby: Callable[[], set[int]] = set) -> bool:
        edit = self._read(edit_id)
        phrasings, named, subject = edit.phrasings, edit.names, edit.subject
        if not (named or subject):
            return self._asks_unnamed(edit_id, query, nearby)
        about = subject if subject and subject <= query.words else frozenset()
        if query.names & named or about:
            about = (query.words & named) | about
            return (self.asks_the_same(phrasings, query.text, about)
                    or bool(asks(query.text, about) & self._lent(edit_id, nearby)))
        return not names(query.text, openings=True) and self._asks_unnamed(edit_id, query, nearby)

    def _lent(self, edit_id: int, nearby: Callable[[], set[int]]) -> frozenset[str]:
        """The words this edit asks with, and those the named edits nearest the query ask with, of those among
        them that share one with this edit, or with one that does, and so on (the same relation, worded
        otherwise): "Which city is home to the headquarters of Rolex?" lends "city" and "home" to "The
        headquarters of Toyota are in", for "Which city does Toyota call home?"; "Which city is home to Nestlé?"
        lends "home" through "Rolex has its headquarters in the city of". A relation's wording, learned from the
        registry itself."""
        others = [read.asked for read in map(self._read, nearby() - {edit_id}) if read.names]
        lent = self._read(edit_id).asked
        while joining := [asked for asked in others if asked & lent and not asked <= lent]:
            lent = lent.union(*joining)
        return lent

    def _asks_unnamed(self, edit_id: int, query: Mentions, nearby: Callable[[], set[int]]) -> bool:
        edit = self._read(edit_id)
        shared = frozenset(w for w in query.words & edit.said if len(w) > 1)
        if shared:
            shared = shared.difference(*(self._read(other).said for other in nearby() - {edit_id}))
        parts = asked_parts(query.text)
        if not shared or any(refilled(phrasing, part) for phrasing in edit.phrasings for part in parts):
            return False
        return self.asks_the_same(edit.phrasings, query.text, shared)

    def asks_the_same(self, phrasings: list[str], text: str, about: frozenset[str]) -> bool:
        """Whether `text` asks what one of `phrasings` asks once the words `about` are taken out: a word in
        common beyond them ("capital" in "Japan's capital city is" and "The capital of Japan is"; "directed" and
        "director" count as one), or, embedded, two of those words within RELATION_RADIUS ("writer" and
        "written"), or the two texts, read as "it", within it ("Where is it?" beside "it can be found in"); the
        query read without its descriptions (`keys.undescribed`: "the Dutch brewer Heineken" is not a question)."""
        asked = asks(text, about)
        mine_asked = frozenset().union(*(asks(phrasing, about) for phrasing in phrasings))
        if asked & mine_asked:
            return True
        if self.embed is None:
            return False
        mine = [as_it(phrasing, about) for phrasing in phrasings] + sorted(mine_asked)
        theirs = list(dict.fromkeys(as_it(undescribed(part), about) for part in asked_parts(text))) + sorted(asked)
        embedded = self.embed(mine + theirs)  # unit rows
        near = 1 - embedded[len(mine):] @ embedded[:len(mine)].T <= RELATION_RADIUS  # (theirs, mine)
        my_texts, their_texts = len(phrasings), len(theirs) - len(asked)  # texts first, then words, on each side
        return bool(near[:their_texts, :my_texts].any() or near[their_texts:, my_texts:].any())


def nearest_edits(registry: EditRegistry, queries: torch.Tensor, mentions: list[Mentions] | None = None,
                  edit_mentions: EditMentions | None = None) -> torch.Tensor:
    """(B,) edit id per row of (B, S, d) queries, -1 for none: per query, the nearest active key within the
    threshold unless a tombstone is nearer (`registry.match`); per row, the nearest of its queries' edits. The
    in-layer router and the router in front of other engines (proxy.py) both decide this way.

    With `mentions` (per row, what its text mentions) a row whose nearest key lies beyond the threshold but
    within NAMED_RADIUS routes to that edit too when it names something the edit's phrasings name, or every word
    of the edit's subject, and asks what the edit asks (`edit_mentions`); and no row routes to an edit whose
    names its own contradict, however near (`EditMentions.names_another`: "South Korea" beside "North Korea"), nor
    to one asking another kind of answer (`EditMentions.asks_another_kind`: a year of an edit answering with a name).
    An edit that names nothing is told from its neighbours by the edits among the row's NEARBY nearest keys."""
    rows, per_row, dim = queries.shape
    named = mentions is not None and edit_mentions is not None
    dists, ids = registry.match(queries.reshape(rows * per_row, dim), distances=True,
                                threshold=NAMED_RADIUS if named else None)
    ids, dists = ids.view(rows, per_row), dists.view(rows, per_row)
    best = torch.where(ids >= 0, dists, torch.full_like(dists, float("inf"))).argmin(1, keepdim=True)
    ids, dists = ids.gather(1, best)[:, 0], dists.gather(1, best)[:, 0]
    if named:
        for row in (ids >= 0).nonzero().flatten().tolist():
            edit_id, query = int(ids[row]), mentions[row]
            nearby = functools.partial(registry.near, queries[row], NEARBY)
            turned_away = (edit_mentions.names_another(edit_id, query)
                           or edit_mentions.asks_another_kind(edit_id, query))
            if turned_away or (dists[row] > registry.config.threshold and not edit_mentions(edit_id, query, nearby)):
                ids[row] = -1
    return ids


@dataclass
class RoutingState:
    """Per-batch decision shared by all edited layers of one model (not a module: holds no parameters)."""

    adapters: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> stacked (A, B) of the cache
    scaling: float = 1.0
    positions: torch.Tensor | None = None  # (B,) index of each row's last real prompt token
    precomputed: torch.Tensor | None = None  # (B, S, d) queries a key source computed before the forward
    mentions: list[Mentions] | None = None  # (B,) what each row's text mentions (KeySource.from_tokens)
    decide: bool = False  # a prompt pass is under way: the first edited layer decides
    edit_ids: torch.Tensor | None = None  # (B,) edit id per row, -1 = none
    rows: torch.Tensor | None = None  # (m,) rows that have an edit
    slots: torch.Tensor | None = None  # (m,) cache slot of each such row's adapter
    forced: Adapter | None = None  # adapters being trained, stacked per layer: (G, r, in), (G, out, r)
    forced_rows: torch.Tensor | None = None  # (B,) which of them each row trains
    opening: bool = False  # decided on this prompt pass, whose output head has yet to run (`Router._opening`)

    def pending(self, positions: torch.Tensor, precomputed: torch.Tensor | None,
                mentions: list[Mentions] | None = None) -> None:
        """A prompt pass begins: forget the last decision; the first edited layer makes the next one."""
        self.positions, self.precomputed, self.mentions, self.decide = positions, precomputed, mentions, True
        self.edit_ids = self.rows = self.slots = None
        self.opening = False

    def routed(self, edit_ids: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor | None) -> None:
        self.edit_ids, self.rows, self.slots, self.decide, self.opening = edit_ids, rows, slots, False, True

    @contextmanager
    def forcing(self, adapters: Adapter, scaling: float) -> Iterator[None]:
        """Training mode: row b of every forward gets adapter `forced_rows[b]` of the stacked `adapters` (set
        `forced_rows` before each forward); no routing, no other edit."""
        self.forced, self.scaling, previous = adapters, scaling, self.scaling
        self.opening = False
        try:
            yield
        finally:
            self.forced, self.forced_rows, self.scaling = None, None, previous


@dataclass
class Prompt:
    """The new tokens of a prompt pass (a whole prompt, or a segment added to a cache) and their attention mask."""

    input_ids: torch.Tensor | None  # (B, T); None when the model was given inputs_embeds
    mask: torch.Tensor | None  # (B, T): the attention mask's columns for these tokens
    rows: int
    length: int  # T
    cached: int  # tokens the model already held for these rows before them
    device: torch.device

    def last_positions(self) -> torch.Tensor:
        """(B,) index of each row's last real token; left and right padding alike."""
        if self.mask is None:
            return torch.full((self.rows,), self.length - 1, dtype=torch.long, device=self.device)
        steps = torch.arange(self.length, device=self.mask.device)  # (T,)
        return (self.mask.bool() * steps).argmax(dim=1).to(self.device)  # (B,)


def cache_length(value) -> int:
    """Tokens held by a KV cache object (a `Cache`, or the legacy tuple of (key, value) per layer), else 0."""
    if hasattr(value, "get_seq_length"):
        return int(value.get_seq_length())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0] \
            and isinstance(value[0][0], torch.Tensor):
        return int(value[0][0].shape[-2])  # (B, heads, T, head_dim)
    return 0


def cached_tokens(kwargs: dict, length: int, mask: torch.Tensor | None) -> int:
    """Tokens the model already holds before this forward's `length` new ones: the attention mask covers them
    all, and a cache passed under any keyword counts its own."""
    counts = [cache_length(v) for v in kwargs.values()]
    if mask is not None:
        counts.append(mask.shape[1] - length)
    return max(counts, default=0)


class PromptPasses:
    """Calls `on_prompt(prompt)` on each prompt pass of `model`; its other forwards are decode steps.

    A prompt pass is
    - inside `model.generate`, the call's first forward: greedy, sampled or beam search, with or without a cache
      (use_cache=False re-reads the whole sequence at every step: still decode steps), and also when the caller
      passes a cache to continue a conversation (then the new turn's tokens are the prompt);
    - outside `generate`, every forward but one that feeds a single new token on top of a cache holding exactly
      the sequence the last forward left (a hand-written decode loop).
    """

    def __init__(self, model: nn.Module, on_prompt: Callable[[Prompt], None]) -> None:
        self.model, self.on_prompt = model, on_prompt
        self._seen: tuple[int, int] | None = None  # (rows, tokens) the model holds after the last forward
        self._calls: list[bool] = []  # per generate call under way: whether its first forward has run
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._shadowed = model.__dict__.get("generate")  # an instance attribute we would hide
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            self._calls.append(False)
            try:
                return original(*args, **kwargs)
            finally:
                self._calls.pop()

        self._generate = model.generate = generate

    def remove(self) -> None:
        self._hook.remove()
        if self.model.__dict__.get("generate") is self._generate:
            if self._shadowed is None:
                del self.model.generate
            else:
                self.model.generate = self._shadowed

    def _before_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if shaped is None:
            return
        rows, length = shaped.shape[0], shaped.shape[1]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cached = cached_tokens(kwargs, length, mask)
        seen, self._seen = self._seen, (rows, cached + length)
        if self._calls:
            if self._calls[-1]:
                return  # a decode step of this generate call
            self._calls[-1] = True
        elif cached and length == 1 and seen == (rows, cached):
            return  # the next token of the sequence the last forward left
        new_mask = mask[:, -length:] if mask is not None else None
        self.on_prompt(Prompt(input_ids, new_mask, rows, length, cached, shaped.device))


class _Captured(Exception):
    """Ends a forward at the first edited layer when only the queries there are wanted (the layer key)."""


class Router:
    """Decides, once per sequence, which edit (if any) each row gets, and hands the layers its adapters.

    An edit's answer is never empty, so a row given an edit does not end its reply before the answer begins: on
    the prompt pass, the `ends` tokens (the end-of-sequence token its training appends) are ruled out after the
    row's last prompt token. An adapter trained to end the reply after the answer, asked in other words, could
    otherwise end it at once (an empty reply to "The opera The Magic Flute is a work by the composer")."""

    def __init__(self, model: nn.Module, registry: EditRegistry, keys: KeySource, cache: AdapterCache,
                 device: torch.device, ends: Sequence[int] = ()) -> None:
        self.model, self.registry, self.keys, self.cache, self.device = model, registry, keys, cache, device
        self.ends = torch.tensor(sorted(set(ends)), dtype=torch.long)
        cfg = registry.config
        self.state = RoutingState(adapters=cache.tensors, scaling=cfg.alpha / cfg.rank)
        self._capture = False
        self._captured: torch.Tensor | None = None
        self._pins: torch.Tensor | None = None  # (B,) edits given by name instead of routed (`pinned`)
        self._length = 0  # tokens of the last prompt pass
        self._edit_mentions = EditMentions(registry, getattr(keys, "embed", None))
        registry.on_change(self._on_change)
        self._passes = PromptPasses(model, self._on_prompt)
        head = model.get_output_embeddings()
        self._head = head.register_forward_hook(self._opening) if head is not None and len(self.ends) else None

    def remove(self) -> None:
        self._passes.remove()
        if self._head is not None:
            self._head.remove()

    # -- in a forward ----------------------------------------------------------------------------
    def _on_prompt(self, prompt: Prompt) -> None:
        if self.state.forced is not None:
            return
        self.registry.refresh()  # edits made by other processes since the last prompt
        self._length = prompt.length
        if self._pins is not None:
            self.state.pending(prompt.last_positions().to(self.device), None)
            return
        self.state.pending(prompt.last_positions().to(self.device), *self.keys.from_tokens(prompt.input_ids, prompt.mask))

    def decide(self, x: torch.Tensor) -> None:
        """The first edited layer's call on a prompt pass, with its input x (B, T, in)."""
        s = self.state
        if self._pins is not None:
            if len(self._pins) != x.shape[0]:
                raise ValueError(f"{len(self._pins)} pinned edits for a batch of {x.shape[0]} rows")
            s.routed(*self._applied(self._pins.to(x.device), x.device))
            return
        query = self.keys.query(x, s.positions, s.precomputed).detach().float()  # (B, d) or (B, S, d)
        query = query[:, None] if query.dim() == 2 else query
        if self._capture:
            self._captured = query
            raise _Captured
        s.routed(*self._resolve(query, s.mentions, x.device))

    def _opening(self, head: nn.Module, args, logits: torch.Tensor) -> None:
        """The output head's hook: on a prompt pass, each edited row's end tokens ruled out after its last
        prompt token. The head may see only the last columns (`generate` keeps one): a row whose last prompt
        token is not among them (right padding) has nothing to rule out."""
        s = self.state
        if not s.opening:
            return
        s.opening = False
        if s.rows is None or not s.rows.numel() or logits.dim() != 3:
            return
        rows = s.rows.to(logits.device)
        columns = s.positions.to(logits.device)[rows] - (self._length - logits.shape[1])
        rows, columns = rows[columns >= 0], columns[columns >= 0]
        logits[rows[:, None], columns[:, None], self.ends.to(logits.device)[None, :]] = float("-inf")

    def _resolve(self, queries: torch.Tensor, mentions: list[Mentions] | None,
                 device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(edit id per row or -1, routed rows, their cache slots) for (B, S, d) queries and what each row
        mentions. An edit whose key or adapter fails its check is never applied."""
        ids = nearest_edits(self.registry, queries, mentions, self._edit_mentions)
        return self._applied(ids.to(device), device)

    def _applied(self, ids: torch.Tensor, device):
        try:
            return self._with_slots(ids, device)
        except CorruptEdit:
            return self._with_slots(self._drop_corrupt(ids), device)

    def _with_slots(self, ids: torch.Tensor, device):
        rows = (ids >= 0).nonzero().flatten()  # (m,)
        slots = self.cache.slots(ids[rows].tolist()).to(device) if rows.numel() else None
        return ids, rows, slots

    def _drop_corrupt(self, ids: torch.Tensor) -> torch.Tensor:
        for edit_id in [i for i in set(ids[ids >= 0].tolist()) if i not in self.cache]:
            try:
                self.registry.adapters([edit_id])
            except CorruptEdit as e:
                log.warning("edit %d not applied, serving the base output instead: %s", edit_id, e)
                ids = torch.where(ids == edit_id, torch.full_like(ids, -1), ids)
        return ids

    def _on_change(self, event: dict) -> None:
        for edit_id in event.get("deactivated", []):
            self.cache.evict(edit_id)

    # -- outside a forward -----------------------------------------------------------------------
    @contextmanager
    def pinned(self, edit_ids: list[int | None]) -> Iterator[None]:
        """Forwards inside get these edits per row (None: the base model) instead of the ones their text routes
        to: how a server that serves each edit under its adapter's name (`sola serve --by-name`) runs them.
        An edit that fails its integrity check still serves the base output."""
        self._pins = torch.tensor([-1 if i is None else i for i in edit_ids], dtype=torch.long)
        try:
            yield
        finally:
            self._pins = None

    def queries(self, enc: dict) -> tuple[torch.Tensor, list[Mentions] | None]:
        """(B, S, d) routing queries of a tokenized batch ([:, 0] is each prompt's key) and what each row
        mentions (None: the key source routes by distance alone). A key source that reads the prompt text (the
        encoder) needs no language model; the layer key runs the model up to the first edited layer and no
        further."""
        queries, mentions = self.keys.from_tokens(enc["input_ids"], enc.get("attention_mask"))
        if queries is not None:
            return queries.float(), mentions
        self._capture = True
        try:
            with torch.no_grad():
                self.model(**with_positions(self.model, enc))
        except _Captured:
            pass
        finally:
            self._capture = False
        queries, self._captured = self._captured, None
        return queries, mentions

    def route(self, enc: dict) -> list[int | None]:
        """The edit each row of a tokenized batch is routed to, or None, as a served forward would decide it."""
        self.registry.refresh()
        ids, _, _ = self._resolve(*self.queries(enc), self.device)
        return [None if i < 0 else i for i in ids.tolist()]

    def routed(self) -> list[int | None]:
        """The edit each row of the last prompt pass was routed to (None: the base model)."""
        ids = self.state.edit_ids
        return [] if ids is None else [None if i < 0 else i for i in ids.tolist()]
