"""The one on-disk store and the file primitives under it: atomic writes, damage reported, resume."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from advface_fast.fileio import atomic_write, is_temp_name, sha256_file, temp_path, write_json_atomic
from advface_fast.store import Store, entry_dirs, leftovers


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "x.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temporary file left
    assert is_temp_name(temp_path(target).name) and not is_temp_name("x.json")
    with pytest.raises(ValueError):
        write_json_atomic(target, {"a": float("nan")})


def _fill(entry, ids, offset=0.0):
    entry.append(ids, {"x": np.arange(len(ids), dtype=np.float32) + offset,
                       "img": np.full((len(ids), 2, 2, 3), 7, np.int16)}, stats={"seconds": 1.5, "steps": len(ids)})


def test_entries_are_keyed_by_config_and_items_by_id(tmp_path):
    store = Store(tmp_path)
    a = store.entry({"model": "m", "eps": (4,)})
    assert store.entry({"eps": [4], "model": "m"}).key == a.key  # order and tuple/list do not matter
    assert store.entry({"model": "m", "eps": (8,)}).key != a.key
    _fill(a, ["p1", "p2"])
    _fill(a, ["p3"], offset=10)
    items = a.read()
    assert items.ids == ["p1", "p2", "p3"] and len(a.chunks()) == 2
    np.testing.assert_array_equal(items.take(["p3", "p1"], "x"), [10.0, 0.0])
    assert items.stats == {"seconds": 3.0, "steps": 3}
    a.compact()
    assert len(a.chunks()) == 1 and a.read().ids == items.ids and a.read().stats == items.stats
    assert json.loads((a.dir / "meta.json").read_text())["config"] == {"eps": [4], "model": "m"}
    assert entry_dirs(tmp_path) == [a.dir]
    with pytest.raises(KeyError, match="p9"):
        items.take(["p9"], "x")


def test_compact_compresses_once_and_mixed_dtypes_read_back(tmp_path):
    """Batches are appended uncompressed; compact() writes one compressed chunk, also when there
    was a single chunk, and leaves an already compressed single chunk alone. int8 and int16 batches
    of one field (attack deltas that fit int8 or not) read back as one int16 array, equal values."""
    from advface_fast.store import _compressed

    e = Store(tmp_path).entry({"k": 1})
    e.append(["a"], {"d": np.array([[-3, 4]], np.int8)})
    assert not _compressed(e.chunks()[0])
    e.compact()
    (only,) = e.chunks()
    assert _compressed(only)
    e.compact()
    assert e.chunks() == [only]  # nothing rewritten
    e.append(["b"], {"d": np.array([[300, -200]], np.int16)})
    e.compact()
    items = e.read()
    assert len(e.chunks()) == 1 and _compressed(e.chunks()[0])
    assert items.arrays["d"].dtype == np.int16
    np.testing.assert_array_equal(items.take(["b", "a"], "d"), [[300, -200], [-3, 4]])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_chunk_warns_and_is_not_trusted(tmp_path, damage):
    entry = Store(tmp_path).entry({"k": 1})
    _fill(entry, ["a", "b"])
    _fill(entry, ["c"])
    bad = entry.chunks()[1]
    raw = bytearray(bad.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        i = raw.index(b"\x07\x00")  # inside the stored "img" array: only the CRC can tell
        raw[i] ^= 0xFF
    else:
        raw = bytearray(b"not a zip at all")
    bad.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged store file"):
        items = entry.read()
    assert items.ids == ["a", "b"]  # the damaged chunk's item is not trusted
    assert not bad.exists() and leftovers(tmp_path) == [bad.with_name(bad.name + ".damaged")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, then set aside: no repeated warning
        assert entry.read().ids == ["a", "b"]


def test_damaged_meta_sets_the_whole_entry_aside(tmp_path):
    entry = Store(tmp_path).entry({"k": 1})
    _fill(entry, ["a"])
    (entry.dir / "meta.json").write_text("{oops")
    with pytest.warns(RuntimeWarning, match="meta.json"):
        assert entry.read().ids == []
    fresh = Store(tmp_path).entry({"k": 1})
    _fill(fresh, ["b"])
    assert fresh.read().ids == ["b"]  # the old chunks, of unknown provenance, never come back
    assert [p.name.endswith(".damaged") for p in leftovers(tmp_path)] == [True]


def test_fields_must_match_ids(tmp_path):
    entry = Store(tmp_path).entry({"k": 1})
    with pytest.raises(ValueError, match="rows"):
        entry.append(["a", "b"], {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="unique"):
        entry.append(["a", "a"], {"x": np.zeros(2)})


def _chip_entry(root, key, scheme, partial=False, complete=True):
    d = root / "chips" / key
    d.mkdir(parents=True)
    if complete:
        (d / "chips.npy").write_bytes(b"x" * 10)
        (d / "index.json").write_text(json.dumps({"meta": {"dataset": scheme}, "ids": ["a"], "created": "t"}))
    if partial:
        (d / "partial").mkdir()
        (d / "partial" / "part-1.npz").write_bytes(b"y")
    return d


def test_cache_prune_removes_only_what_no_current_code_can_use(tmp_path, capsys):
    from advface_fast.cli import main
    from advface_fast.experiments.runner import ROWS_SCHEME
    from advface_fast.pair_chips import CHIP_CACHE_SCHEME

    current = _chip_entry(tmp_path, "cur", CHIP_CACHE_SCHEME, partial=True)
    old = _chip_entry(tmp_path, "old", "dataset-fingerprint-abc")
    resumable = _chip_entry(tmp_path, "run", CHIP_CACHE_SCHEME, partial=True, complete=False)
    temp = current / temp_path(current / "chips.npy").name
    temp.write_bytes(b"half")
    rows = Store(tmp_path / "attacks").entry({"scheme": ROWS_SCHEME, "attack": {"name": "pgd", "eps": 4}})
    _fill(rows, ["p"])
    stale_rows = Store(tmp_path / "attacks").entry({"scheme": "attack-rows-v0"})
    _fill(stale_rows, ["p"])
    v1 = tmp_path / "attacks" / "0123456789abcdef.npz"
    v1.write_bytes(b"old whole-row file")
    (tmp_path / "tuning").mkdir()
    (tmp_path / "lfw_home").mkdir()

    assert main(["cache", "info", "--root", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    status = {e["path"]: e["status"] for c in info["caches"].values() for e in c["entries"]}
    assert status[str(old)] == "old key scheme" and status[str(current)] == "ok"
    assert status[str(rows.dir)] == "ok" and status[str(stale_rows.dir)] == "old key scheme"

    assert main(["cache", "prune", "--root", str(tmp_path), "--dry-run"]) == 0
    assert "would remove 6 item(s)" in capsys.readouterr().out and old.exists() and temp.exists()
    assert main(["cache", "prune", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "removed 6 item(s)" in out
    assert not old.exists() and not temp.exists() and not v1.exists() and not stale_rows.dir.exists()
    assert not (current / "partial").exists() and not (tmp_path / "tuning").exists()
    # Kept: usable entries, a resumable partial run, data.
    assert (current / "chips.npy").exists() and (resumable / "partial").exists() and rows.read().ids == ["p"]
    assert (tmp_path / "lfw_home").exists()
    assert main(["cache", "info", "--root", str(tmp_path)]) == 0
    assert "unusable (" not in capsys.readouterr().out


def test_import_is_light_and_create_model_is_top_level():
    import subprocess
    import sys

    code = ("import sys, advface_fast; assert 'torch' not in sys.modules, 'import pulled torch'; "
            "from advface_fast import create_model; import advface_fast.models as m; "
            "assert create_model is m.create_model and 'create_model' in dir(advface_fast)")
    subprocess.run([sys.executable, "-c", code], check=True)
