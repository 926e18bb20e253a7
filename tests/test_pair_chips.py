"""End to end on the lfw_ci subset: `advface verify` through the CLI and the Python API."""

from __future__ import annotations

import json

import pytest

from advface_fast.cli import main
from advface_fast.cli_options import parse_folds

REQUIRED_KEYS = {"model", "n_pairs", "accuracy_mean", "accuracy_std", "matched_accuracy", "mismatched_accuracy",
                 "auc", "tar_at_far_1e-3", "tar_at_far_1e-2", "thresholds", "alignment_paths"}


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("advface-home")


def test_verify_cli_on_lfw_ci(lfw_ci, tmp_path, cache_home, monkeypatch, capsys):
    monkeypatch.setenv("ADVFACE_HOME", str(cache_home))
    out = tmp_path / "run"
    assert main(["verify", "--lfw", str(lfw_ci), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "cosine+flip" in printed and "l2" in printed
    report = json.loads((out / "verify.json").read_text())
    assert REQUIRED_KEYS <= report.keys()
    assert report["n_pairs"] == 40 and report["folds"] == [1, 2] and len(report["thresholds"]) == 2
    assert sum(report["alignment_paths"].values()) == report["n_images"] == 66
    # 40 real pairs with a 99%-class model: a broken port, alignment or protocol would show here.
    assert report["accuracy_mean"] >= 0.9
    assert set(report["results"]) == {"cosine", "l2", "cosine+flip", "l2+flip"}
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Results name the data, not the paths of the machine that made them (they get committed).
    assert str(lfw_ci) not in (out / "verify.json").read_text().replace(json.dumps(str(lfw_ci))[1:-1], str(lfw_ci))
    assert report["input"]["pairs_file"] == "pairs.txt"


def test_second_run_reuses_the_chip_cache(lfw_ci, cache_home, monkeypatch):
    monkeypatch.setenv("ADVFACE_HOME", str(cache_home))
    import advface_fast.align.dlib_align as dlib_align
    from advface_fast.pair_chips import prepare_pairs

    prepare_pairs(lfw_ci, progress=False, workers=1)  # fills the cache if the CLI test did not run

    def fail(*args, **kwargs):
        raise AssertionError("aligned again despite the cache")

    monkeypatch.setattr(dlib_align, "_align_all", fail)
    pairs = prepare_pairs(lfw_ci, progress=False, workers=1)
    assert len(pairs) == 40 and pairs.chips.chips.shape == (66, 150, 150, 3)


def test_fold_selection_reuses_the_chips_of_the_full_set(lfw_ci, cache_home, monkeypatch):
    monkeypatch.setenv("ADVFACE_HOME", str(cache_home))
    import advface_fast.align.dlib_align as dlib_align
    from advface_fast.pair_chips import prepare_pairs

    full = prepare_pairs(lfw_ci, progress=False, workers=1)
    monkeypatch.setattr(dlib_align, "_align_all", lambda *a, **k: pytest.fail("aligned a subset again"))
    pairs = prepare_pairs(lfw_ci, folds=[2], progress=False, workers=1)
    assert len(pairs) == 20 and set(pairs.folds) == {2}
    # The same pair gets the same chips whichever selection it came from.
    first = full.dataset.pairs.index(pairs.dataset.pairs[0])
    assert (pairs.chips.chips[pairs.query[0]] == full.chips.chips[full.query[first]]).all()


def test_bad_path_is_a_clear_error(tmp_path, capsys):
    assert main(["verify", "--lfw", str(tmp_path / "nowhere"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "error" in err


def test_parse_folds():
    assert parse_folds("1,3,5-7") == [1, 3, 5, 6, 7]
    assert parse_folds(None) is None


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    assert "--lfw" in text and "thresholds" in text and "example" in text


def test_verify_downloads_lfw_when_none_is_given(lfw_ci, tmp_path, monkeypatch, capsys):
    import advface_fast.data as data

    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path))
    monkeypatch.delenv("ADVFACE_LFW", raising=False)
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return lfw_ci

    monkeypatch.setattr(data, "download_lfw", fake_download)
    assert main(["verify", "--quiet", "--workers", "1", "--folds", "1"]) == 0
    assert calls == [tmp_path / "lfw_home"] and "downloading" in capsys.readouterr().err
    assert main(["verify", "--quiet", "--no-download"]) == 2  # and never without asking
