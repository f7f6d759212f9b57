"""RegistryConfig and Record: validation that names the bad value, JSON-safe round trips."""
import json

import pytest
from registry_helpers import make_config

from registry import LayerSpec, Record, RegistryConfig, ValidationError


def test_config_round_trips_through_json():
    config = make_config()
    back = RegistryConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and isinstance(back.layers[0], LayerSpec)


@pytest.mark.parametrize("field, value, message", [
    ("key_dim", 0, "key_dim must be a positive integer, got 0"),
    ("rank", 2.5, "rank must be a positive integer, got 2.5"),
    ("metric", "dot", "metric must be 'cosine' or 'l2', got 'dot'"),
    ("threshold", float("nan"), "threshold must be a finite number, got nan"),
    ("threshold", -0.1, "threshold must be >= 0.0, got -0.1"),
    ("alpha", 0, "alpha must be > 0.0, got 0"),
    ("layers", [], "layers must name at least one edited layer"),
    ("layers", [{"name": "a", "in_features": 4, "out_features": 0}], "out_features of layer a"),
    ("layers", [LayerSpec("a", 2, 2), LayerSpec("a", 2, 2)], "layer names must be unique"),
    ("key_source", "", "key_source must be a non-empty string"),
    ("fingerprint", {"x": object()}, "fingerprint is not JSON-serialisable"),
])
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(**{field: value})


def test_validation_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        make_config(rank=-1)


def test_record_round_trips_through_json():
    rec = Record(3, "p", "t", "active", 1.0, 2.0, 1, None, "a" * 64, "b" * 64, {"steps": 4})
    assert Record.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
