"""Choosing the routing threshold from data: as wide as neighbours allow, so paraphrases route too.

Only keys are computed (no training): the calibration facts' edit prompts play the stored keys, their
paraphrases must reach their own key, and their neighbour prompts (other subjects) must reach none.
"""
from __future__ import annotations

import torch

from .facts import UNRELATED, Fact


def key_distances(editor, facts: list[Fact]) -> dict[str, list[float]]:
    """Distances to the calibration keys: paraphrase -> own key, neighbour/unrelated -> nearest key."""
    keys = torch.stack([editor.key(f.prompt) for f in facts])  # (n, d)
    metric = editor.registry.config.metric

    def dist(q: torch.Tensor) -> torch.Tensor:  # (m, d) -> (m, n)
        if metric == "cosine":
            return 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
        return torch.cdist(q, keys)

    para, own = zip(*[(editor.key(p), i) for i, f in enumerate(facts) for p in f.paraphrases])
    para_d = dist(torch.stack(para)).gather(1, torch.tensor(own)[:, None]).squeeze(1)
    neighbours = torch.stack([editor.key(p) for f in facts for p in f.neighbours])
    unrelated = torch.stack([editor.key(p) for p in UNRELATED])
    return {"paraphrase": para_d.tolist(), "neighbour": dist(neighbours).min(1).values.tolist(),
            "unrelated": dist(unrelated).min(1).values.tolist()}


def choose_threshold(distances: dict[str, list[float]], max_false_route: float = 0.01) -> dict:
    """The largest threshold that routes at most `max_false_route` of neighbour and unrelated prompts."""
    outsiders = sorted(distances["neighbour"] + distances["unrelated"])
    allowed = int(max_false_route * len(outsiders))  # this many may fall inside
    threshold = outsiders[allowed] * 0.999 if allowed < len(outsiders) else outsiders[-1]
    para = distances["paraphrase"]
    return {
        "threshold": threshold,
        "paraphrase_recall": sum(d <= threshold for d in para) / len(para),
        "false_route_rate": sum(d <= threshold for d in outsiders) / len(outsiders),
        "paraphrases": len(para), "outsiders": len(outsiders),
    }


def calibrate(editor, facts: list[Fact], max_false_route: float = 0.01, apply: bool = True) -> dict:
    """Measure, choose, and (with `apply`) store the threshold in the editor's registry."""
    result = choose_threshold(key_distances(editor, facts), max_false_route)
    result["previous_threshold"] = editor.registry.config.threshold
    if apply:
        editor.registry.set_threshold(result["threshold"])
    return result
