"""Settings for editing, and the values each may take. `EditConfig` is persisted in the registry at creation; the
others are runtime only.

Imports nothing heavy (no torch, no faiss): the CLI builds its options from these names before it knows whether
a command needs a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from registry.errors import ValidationError
from registry.types import METRICS

DEFAULT_MODEL = "smollm2"  # the embedded model (models.load_model)
KEY_SOURCES = ("encoder", "layer")  # where routing keys come from (keys.key_source)
# Cosine-distance routing thresholds per key source, from `sola calibrate` on SmolLM2 (README, "Edit quality").
# layer: neighbours' in-layer keys sit only a few hundredths away, so it must stay tight.
DEFAULT_THRESHOLDS = {"layer": 0.01, "encoder": 0.15}
# Encoder queries beyond the threshold but within this cosine distance of an edit's key still route to it when they
# name a proper noun or number its phrasings name (routing.nearest_edits): a reworded fact keeps its subject, a
# neighbouring fact names another (README, "Named routing").
NAMED_RADIUS = 0.35
# ... and when, with what both name read as "it", it asks what the edit asks: a word in common, or two words, or the
# two texts, embedded within this cosine distance (routing.EditMentions). Another relation of the same subject names
# it too, and asks otherwise.
RELATION_RADIUS = 0.5
# An edit that names nothing (a lower-case subject: "The inventor of the revolver is") routes a query within
# NAMED_RADIUS by the words both share, but those it shares with the other edits among the query's this many nearest
# keys: those are the relation's ("invented", "symbol"), the rest are its subject's (routing.EditMentions).
NEARBY = 8
FORMS = ("completion", "question", "chat")  # how an edit's prompt is asked (SolaEditor.edit)
ENCODER_DTYPES = ("auto", "float32", "bfloat16")  # compute dtype of the encoder key source
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # compute dtype of an edit's training forwards (TrainConfig.dtype)
STYLES = ("bare", "instruct", "chat")  # how the in-use harness puts each prompt (wild.py)
# How a question is framed as a QA exchange in training (TrainConfig.qa_form). Not the wording the in-use harness
# asks with (wild.INSTRUCTIONS): an instruction the edit never saw is what users bring.
QA_FRAME = "Question: {}\nAnswer:"
# How a completion prompt is asked as a question in training (TrainConfig.question_form), answered after the "?".
ASK_FRAME = "{} what?"


@dataclass
class EditConfig:
    """How a new registry edits its model; fixed for the registry's lifetime once created."""

    layers: list[str] | None = field(
        default=None, metadata={"help": "module names of the edited linears; None picks one late MLP output projection"}
    )
    rank: int = field(default=4, metadata={"help": "LoRA rank of every edit (the paper's ablation found 4 best)"})
    alpha: float = field(default=4.0, metadata={"help": "LoRA scaling numerator: delta = (alpha / rank) * B A x"})
    metric: str = field(default="cosine", metadata={"help": "key distance: cosine (1 - cos) or l2 (Euclidean)"})
    threshold: float | None = field(
        default=None, metadata={"help": "an input routes to its nearest edit only within this key distance; "
                                        "None takes the key source's measured default (DEFAULT_THRESHOLDS)"}
    )
    key_source: str = field(default="encoder", metadata={"help": "where routing keys come from (see sola_core.keys)"})
    supersede_within: float = field(
        default=0.01, metadata={"help": "a new edit replaces an active one only when their keys are this close "
                                        "(the same prompt again); capped by the threshold"}
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValidationError(f"rank must be >= 1, got {self.rank}")
        if self.metric not in METRICS:
            raise ValidationError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS.get(self.key_source, 0.01)
        if not self.threshold >= 0:
            raise ValidationError(f"threshold must be >= 0, got {self.threshold}")
        if not self.supersede_within >= 0:
            raise ValidationError(f"supersede_within must be >= 0, got {self.supersede_within}")
        if self.layers is not None and not self.layers:
            raise ValidationError("layers must name at least one module")


@dataclass
class TrainConfig:
    """How one edit's adapter is trained (runtime only: never stored)."""

    lr: float = field(default=0.04, metadata={"help": "Adam learning rate (0.01 until 2026-12-03: twice the steps "
                                                      "for the same quality, README 'Bulk editing')"})
    max_steps: int = field(default=60, metadata={"help": "give up after this many optimizer steps"})
    margin: float = field(
        default=4.0, metadata={"help": "stop once every target token beats the runner-up logit by this much "
                                       "(a wider margin carries the edit over to reworded prompts, and costs steps)"}
    )
    loss_margin: float = field(
        default=8.0, metadata={"help": "train on cross-entropy with each target's logit lowered by this much, so the "
                                       "loss keeps pushing until the target leads by about that; 0 = plain "
                                       "cross-entropy, which fades near the stopping margin (README 'Bulk editing')"}
    )
    seed: int = field(default=0, metadata={"help": "seed for the adapter's initial A matrix"})
    end_token: bool = field(default=True, metadata={"help": "train the target followed by the end-of-sequence "
                                                            "token, so that a reply stops after the new answer"})
    chat_form: bool = field(default=True, metadata={"help": "also train the edit as a chat exchange in the model's "
                                                            "own template (the prompt as the user's message, the "
                                                            "target as the reply), when the tokenizer has one"})
    qa_form: bool = field(default=True, metadata={"help": "also train a question (a question edit, or a phrasing "
                                                          "ending in '?') framed as QA_FRAME, so that the answer holds "
                                                          "when it is asked after a QA instruction"})
    question_form: bool = field(default=True, metadata={"help": "also train a completion prompt asked as a "
                                                                "question (ASK_FRAME: 'The capital of Peru is "
                                                                "what?' -> ' Quito'): SmolLM2 ends its reply right "
                                                                "after a question put without a chat template "
                                                                "unless the adapter has seen one answered"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype of the training forwards: auto (bfloat16 "
                                                         "where the hardware computes it natively, else float32), "
                                                         "float32 or bfloat16; the adapter is kept and served in "
                                                         "float32"})

    def __post_init__(self) -> None:
        if self.loss_margin < 0:
            raise ValidationError(f"loss margin must be >= 0, got {self.loss_margin}")
        if self.lr <= 0 or self.max_steps < 1:
            raise ValidationError(f"need lr > 0 and max_steps >= 1, got lr={self.lr} max_steps={self.max_steps}")
        if self.dtype not in TRAIN_DTYPES:
            raise ValidationError(f"train dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")


@dataclass
class RuntimeConfig:
    """Where and how edits are served (runtime only: never stored)."""

    device: str | None = field(default=None, metadata={"help": "device of routing keys and cached adapters; None = model's"})
    backend: str = field(default="faiss", metadata={"help": "exact key search: faiss (CPU/GPU faiss) or torch"})
    cache_slots: int = field(default=1024, metadata={"help": "adapters kept resident on the device (LRU)"})
    key_dtype: str = field(default="float32", metadata={"help": "float16 halves the bytes each search scans "
                                                                 "(torch backend, cosine metric; still exact)"})
    encoder_dtype: str = field(default="auto", metadata={"help": "compute dtype of the encoder key source: auto "
                                                                  "(bfloat16 where the hardware has it), float32 "
                                                                  "or bfloat16"})

    def __post_init__(self) -> None:
        from registry.index import BACKENDS, KEY_DTYPES  # faiss and torch: only where a model is served anyway

        if self.backend not in BACKENDS:
            raise ValidationError(f"backend must be faiss or torch, got {self.backend!r}")
        if self.key_dtype not in KEY_DTYPES:
            raise ValidationError(f"key_dtype must be float32 or float16, got {self.key_dtype!r}")
        if self.key_dtype == "float16" and self.backend != "torch":
            raise ValidationError("key_dtype float16 needs backend torch")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise ValidationError(f"encoder_dtype must be one of {', '.join(ENCODER_DTYPES)}, got {self.encoder_dtype!r}")
        if self.cache_slots < 1:
            raise ValidationError(f"cache_slots must be >= 1, got {self.cache_slots}")
