"""An edit may hold several keys, one per phrasing of its fact: each routes to it, and every operation (supersede,
rollback with tombstones, restore, replay in another process, verify, export/import) moves all of them together."""
import numpy as np
import pytest
from registry_helpers import damage, make_adapter, make_config, make_key, near

from registry import EditRegistry
from registry.codec import encode_json, sha256
from registry.errors import ValidationError
from registry.store import Store
from registry.meta import put_meta

PARAPHRASES = ["p1 said otherwise", "p1 asked as a question?"]


def phrased(seed: int) -> np.ndarray:
    """The keys of an edit with two paraphrases: its prompt's, then one per paraphrase (far apart)."""
    return np.stack([make_key(seed), make_key(seed + 1000), make_key(seed + 2000)])


@pytest.fixture
def reg(tmp_path):
    with EditRegistry.create(tmp_path / "r", make_config()) as reg:
        yield reg


def test_every_phrasing_routes_to_its_edit_and_all_leave_together(reg):
    edit = reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES)
    other = reg.add("p2", "t2", make_key(2), make_adapter(reg.config, 2))
    assert reg.get(edit).paraphrases == PARAPHRASES and reg.get(other).paraphrases == []
    np.testing.assert_array_equal(reg.keys(edit), phrased(1))
    queries = np.concatenate([phrased(1), make_key(2)[None], make_key(3)[None]])
    assert reg.match(queries).tolist() == [edit, edit, edit, other, -1]
    reg.rollback(edit)
    assert reg.match(queries).tolist() == [-1, -1, -1, other, -1]
    dists, ids = reg.match(queries, distances=True)  # the nearest active key's distance, from the same search
    assert ids.tolist() == [-1, -1, -1, other, -1]
    np.testing.assert_array_equal(dists, reg.nearest(queries)[0])
    assert reg.verify().ok
    reg.restore(edit)
    assert reg.match(queries).tolist() == [edit, edit, edit, other, -1]
    assert reg.verify().ok


def test_near_gives_the_active_edits_among_each_rows_nearest_keys(reg):
    """What the router reads as the edits around a query: an edit counts once however many of its keys are near,
    a rolled-back one not at all, and a NaN row (a query's padding) finds nothing."""
    edit = reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES)
    other = reg.add("p2", "t2", make_key(2), make_adapter(reg.config, 2))
    padding = np.full(len(make_key(1)), np.nan, dtype=np.float32)
    assert reg.near(np.stack([make_key(1), padding]), 1) == {edit}
    assert reg.near(np.stack([make_key(1), make_key(2)]), 1) == {edit, other}
    assert reg.near(make_key(1)[None], 4) == {edit, other}  # all four keys
    reg.rollback(edit)
    assert reg.near(make_key(1)[None], 4) == {other}


def test_a_paraphrase_key_shields_its_inputs_after_rollback(tmp_path):
    """A tombstone covers every phrasing: a neighbour near a paraphrase does not take over its inputs."""
    with EditRegistry.create(tmp_path / "r", make_config(threshold=0.3, supersede_within=1e-3)) as reg:
        edit = reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES)
        close = near(make_key(1 + 1000), scale=0.2)  # near the first paraphrase's key only
        neighbour = reg.add("p9", "t9", close, make_adapter(reg.config, 9))
        reg.rollback(edit)
        assert reg.match(np.stack([make_key(1 + 1000), close])).tolist() == [-1, neighbour]


def test_a_new_edit_near_any_phrasing_supersedes_the_whole_edit(reg):
    edit = reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES)
    again = reg.add("p1 asked as a question?", "t1b", near(make_key(1 + 2000)), make_adapter(reg.config, 2))
    assert reg.get(edit).status == "superseded" and reg.get(again).supersedes == edit
    assert reg.match(phrased(1)).tolist() == [-1, -1, again]  # the old edit's keys all left the index
    reg.rollback(again)
    assert reg.match(phrased(1)).tolist() == [edit, edit, edit]  # ... and all came back with it
    assert reg.verify().ok


def test_add_many_supersedes_through_any_phrasing(reg):
    items = [{"prompt": "p1", "target": "t", "keys": phrased(1), "adapter": make_adapter(reg.config, 1),
              "paraphrases": PARAPHRASES},
             {"prompt": "p5", "target": "t", "keys": np.stack([make_key(5), near(make_key(1 + 1000))]),
              "adapter": make_adapter(reg.config, 5), "paraphrases": ["p1 said otherwise"]}]
    first, second = reg.add_many(items)
    assert reg.get(first).superseded_by == second
    assert reg.match(phrased(1)).tolist() == [-1, second, -1]


def test_other_processes_replay_all_keys(tmp_path):
    with EditRegistry.create(tmp_path / "r", make_config()) as writer, EditRegistry.open(tmp_path / "r") as reader:
        assert reader.match(make_key(1)[None]).tolist() == [-1]  # builds the reader's index
        edit = writer.add("p1", "t1", phrased(1), make_adapter(writer.config, 1), paraphrases=PARAPHRASES)
        reader.refresh()
        assert reader.match(phrased(1)).tolist() == [edit] * 3
        writer.rollback(edit)
        reader.refresh()
        assert reader.match(phrased(1)).tolist() == [-1] * 3
        assert reader.verify().ok


def test_export_and_import_keep_every_phrasing_and_the_subject(tmp_path, reg):
    edit = reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES, subject="p1")
    assert reg.get(edit).subject == "p1"
    assert reg.export(tmp_path / "b.safetensors") == 1
    with EditRegistry.create(tmp_path / "dst", make_config()) as dst:
        [new] = dst.import_(tmp_path / "b.safetensors")
        assert dst.get(new).paraphrases == PARAPHRASES and dst.get(new).subject == "p1"
        np.testing.assert_array_equal(dst.keys(new), reg.keys(edit))
        assert dst.match(phrased(1)).tolist() == [new] * 3


def test_keys_must_match_the_phrasings(reg):
    with pytest.raises(ValidationError, match=r"^an edit with 2 paraphrases needs 3 keys \(the prompt's, then each "
                                              r"paraphrase's\), got 1$"):
        reg.add("p1", "t1", make_key(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES)
    with pytest.raises(ValidationError, match="^paraphrases must be a list of strings$"):
        reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases="one string")
    assert reg.count() == 0


def test_verify_finds_keys_that_do_not_match_the_phrasings(tmp_path):
    path = tmp_path / "r"
    with EditRegistry.create(path, make_config()) as reg:
        edit = reg.add("p1", "t1", phrased(1), make_adapter(reg.config, 1), paraphrases=PARAPHRASES)
        rec = reg.get(edit)
    store = Store(path)
    blob = make_key(1).tobytes()  # one key left, for three phrasings
    store.write(lambda txn: (txn.put("keys", edit, blob),
                             txn.put("records", edit, encode_json({**rec.to_dict(), "key_sha256": sha256(blob)}))))
    store.close()
    with EditRegistry.open(path) as reg:
        assert reg.verify().problems == [f"edit {edit} has 1 keys for 3 phrasings"]


def test_a_version_2_registry_opens_as_it_is(tmp_path):
    path = tmp_path / "r"
    with EditRegistry.create(path, make_config()) as reg:
        edit = reg.add("p1", "t1", make_key(1), make_adapter(reg.config, 1))
        damage(reg, lambda txn: put_meta(txn, "schema_version", 2))
    with pytest.raises(Exception, match="written by an older version \\(schema 2\\); open it once without read-only"):
        EditRegistry.open(path, readonly=True)
    with EditRegistry.open(path) as reg:
        assert reg.stats()["schema_version"] == 3 and reg.verify().ok
        assert reg.match(make_key(1)[None]).tolist() == [edit]
