"""Face alignment (dlib HOG/CNN/centre chain + 5 landmarks) and the chip cache, on real lfw_ci images."""

from __future__ import annotations

import json
from pathlib import Path

import dlib
import numpy as np
import pytest
from PIL import Image

from advface_fast.align import (
    LFW_CENTER_BOX,
    AlignConfig,
    AlignedChips,
    ChipCache,
    DlibAligner,
    NoFaceError,
    align_images,
    cache_meta,
)
from advface_fast.align.dlib_align import SHAPE_PREDICTOR_FILE, center_rect
from advface_fast.cache import config_key, default_cache_root
from advface_fast.models.assets import model_file

from conftest import LFW_CI  # noqa: E402  (conftest decides where the test data lives)
IMAGES = LFW_CI / "lfw-deepfunneled"

pytestmark = pytest.mark.usefixtures("lfw_ci")  # skipped without the data; failed in CI mode


def load(image_id: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / image_id).convert("RGB"))


@pytest.fixture(scope="module")
def all_ids() -> list[str]:
    return sorted(str(p.relative_to(IMAGES)) for p in IMAGES.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def aligner() -> DlibAligner:
    return DlibAligner()


@pytest.fixture(scope="module")
def reference(all_ids) -> AlignedChips:
    """All lfw_ci images aligned in this process without any cache."""
    return align_images(all_ids, load, progress=False, workers=1)


class CountingAlign:
    """Counts DlibAligner.align calls (alignment runs in-process with workers=1)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = DlibAligner.align

        def counted(aligner_self, image):
            self.calls += 1
            return original(aligner_self, image)

        monkeypatch.setattr(DlibAligner, "align", counted)


# -- small helpers -----------------------------------------------------------------------------------


def test_model_file_finds_package_files_and_rejects_unknown_names():
    assert model_file(SHAPE_PREDICTOR_FILE).stat().st_size > 1_000_000
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        model_file("no_such_model.dat")


def test_default_cache_root_and_config_key(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("ADVFACE_HOME")
    assert default_cache_root() == Path.home() / ".cache" / "advface-fast"
    assert config_key(a=1, b=[1, 2]) == config_key(b=[1, 2], a=1)  # order of arguments is irrelevant
    assert config_key(a=1) != config_key(a=2)
    assert len(config_key(a=1)) == 16


def test_config_key_names_every_setting():
    base = AlignConfig()
    variants = [
        AlignConfig(size=112),
        AlignConfig(padding=0.3),
        AlignConfig(upsample=0),
        AlignConfig(detector_chain=("hog", "center")),
        AlignConfig(center_box=(0.2, 0.2, 0.8, 0.8)),
    ]
    keys = {base.key()} | {v.key() for v in variants}
    assert len(keys) == 1 + len(variants)
    assert AlignConfig(detector_chain=["hog", "cnn", "center"]).key() == base.key()
    with pytest.raises(ValueError):
        AlignConfig(detector_chain=("hog", "sift"))
    # The cache key changes with the config and with the dataset.
    key = ChipCache("unused", cache_meta(base, "data-a")).key
    assert ChipCache("unused", cache_meta(AlignConfig(padding=0.3), "data-a")).key != key
    assert ChipCache("unused", cache_meta(base, "data-b")).key != key
    assert ChipCache("unused", cache_meta(AlignConfig(), "data-a")).key == key


# -- the aligner --------------------------------------------------------------------------------------


def test_lfw_ci_chips_have_right_shape_and_most_take_hog(reference, all_ids):
    assert reference.chips.shape == (len(all_ids), 150, 150, 3)
    assert reference.chips.dtype == np.uint8
    assert reference.ids == all_ids
    counts = reference.path_counts()
    assert sum(counts.values()) == len(all_ids)
    assert counts["hog"] >= 0.9 * len(all_ids), counts
    # Chips are images, not blank buffers.
    assert reference.chips.reshape(len(all_ids), -1).std(axis=1).min() > 10


def test_chip_is_exactly_dlib_get_face_chip_on_nearest_centre_hog_box(aligner, all_ids):
    image = load(all_ids[0])
    rects = dlib.get_frontal_face_detector()(image, 1)
    assert len(rects) >= 1
    h, w = image.shape[:2]
    rect = min(rects, key=lambda r: ((r.left() + r.right() - w + 1) / 2) ** 2 + ((r.top() + r.bottom() - h + 1) / 2) ** 2)
    shape = dlib.shape_predictor(str(model_file(SHAPE_PREDICTOR_FILE)))(image, rect)
    expected = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    chip, path = aligner.align(image)
    assert path == "hog"
    assert np.array_equal(chip, expected)


def test_blank_image_falls_through_to_centre_box(aligner):
    gray = np.full((250, 250, 3), 128, np.uint8)
    chip, path = aligner.align(gray)
    assert path == "center"
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    # On 250x250 the centre box is the median LFW HOG box.
    assert center_rect(250, 250, LFW_CENTER_BOX) == dlib.rectangle(67, 80, 175, 187)


def test_rotated_face_missed_by_hog_is_found_by_cnn(aligner):
    # HOG is trained on upright faces; 60 degrees of roll defeats it, the CNN detector copes.
    image = np.asarray(Image.open(IMAGES / "Abdullah_Gul/Abdullah_Gul_0001.jpg").convert("RGB").rotate(60))
    assert len(dlib.get_frontal_face_detector()(image, 1)) == 0
    chip, path = aligner.align(image)
    assert path == "cnn"
    assert chip.shape == (150, 150, 3)


def test_chain_order_and_nearest_centre_choice_with_fake_detectors():
    aligner = DlibAligner(AlignConfig(detector_chain=("hog", "cnn", "center")))
    calls = []
    far, near = dlib.rectangle(0, 0, 50, 50), dlib.rectangle(80, 90, 170, 180)
    aligner.detectors["hog"] = lambda im: calls.append("hog") or []
    aligner.detectors["cnn"] = lambda im: calls.append("cnn") or [far, near]
    aligner.detectors["center"] = lambda im: calls.append("center") or [far]
    image = load("Abdullah_Gul/Abdullah_Gul_0001.jpg")
    rect, path = aligner.locate(image)
    assert (rect, path, calls) == (near, "cnn", ["hog", "cnn"])

    hog_only = DlibAligner(AlignConfig(detector_chain=("hog",)))
    hog_only.detectors["hog"] = lambda im: []
    with pytest.raises(NoFaceError):
        hog_only.align(image)
    with pytest.raises(ValueError):
        aligner.align(image.astype(np.float32))


def test_output_does_not_depend_on_workers(reference, all_ids):
    ids = all_ids[:12]  # more than one batch, so the process pool is really used
    pooled = align_images(ids, load, progress=False, workers=2)
    assert pooled.paths == reference.subset(ids).paths
    assert np.array_equal(pooled.chips, reference.subset(ids).chips)


# -- the cache ----------------------------------------------------------------------------------------


def test_cache_round_trip_subset_and_superset(tmp_path, monkeypatch, reference, all_ids):
    counter = CountingAlign(monkeypatch)
    ids = all_ids[:6]
    first = align_images(ids, load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    assert counter.calls == 6
    second = align_images(ids, load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    assert counter.calls == 6  # nothing aligned again
    assert isinstance(second.chips, np.memmap)
    for result in (first, second):
        assert result.ids == ids
        assert np.array_equal(result.chips, reference.subset(ids).chips)
        assert result.paths == reference.subset(ids).paths

    subset = align_images(ids[3:0:-1], load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    assert counter.calls == 6
    assert np.array_equal(subset.chips, reference.subset(ids[3:0:-1]).chips)

    superset = all_ids[4:9]  # 2 cached, 3 new
    grown = align_images(superset, load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    assert counter.calls == 9
    assert np.array_equal(grown.chips, reference.subset(superset).chips)
    assert len(ChipCache(tmp_path, cache_meta(AlignConfig(), "lfw_ci")).load()) == 9  # entry holds the union

    other = align_images(ids[:2], load, AlignConfig(size=112), tmp_path, "lfw_ci", progress=False, workers=1)
    assert counter.calls == 11  # a changed config is a different entry
    assert other.chips.shape == (2, 112, 112, 3)
    align_images(ids[:2], load, cache_dir=tmp_path, dataset_fingerprint="other-data", progress=False, workers=1)
    assert counter.calls == 13  # and so is a different dataset


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage_index"])
def test_damaged_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch, reference, all_ids, damage):
    ids = all_ids[:4]
    align_images(ids, load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    cache = ChipCache(tmp_path, cache_meta(AlignConfig(), "lfw_ci"))
    if damage == "truncate":
        data = cache.chips_path.read_bytes()
        cache.chips_path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data = bytearray(cache.chips_path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cache.chips_path.write_bytes(bytes(data))
    else:
        cache.index_path.write_text("{not json")

    counter = CountingAlign(monkeypatch)
    with pytest.warns(RuntimeWarning, match="unusable chip cache"):
        rebuilt = align_images(ids, load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    assert counter.calls == len(ids)
    assert np.array_equal(rebuilt.chips, reference.subset(ids).chips)
    assert cache.load() is not None  # the rebuilt entry is valid again
    assert json.loads(cache.index_path.read_text())["ids"] == ids


def test_interrupted_run_resumes_from_checkpoints(tmp_path, monkeypatch, reference, all_ids):
    ids = all_ids[:7]
    loaded = []

    class Interrupted(Exception):
        pass

    def flaky_load(image_id):
        if len(loaded) == 5:
            raise Interrupted  # the user stops the run while the 6th image loads
        loaded.append(image_id)
        return load(image_id)

    with pytest.raises(Interrupted):
        align_images(ids, flaky_load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False,
                     workers=1, checkpoint_every=2)
    cache = ChipCache(tmp_path, cache_meta(AlignConfig(), "lfw_ci"))
    assert cache.load() is None  # no complete entry yet
    assert sum(len(p) for p in cache.load_checkpoints()) == 4  # two chunks of 2 were saved

    # A damaged checkpoint is skipped, not trusted.
    (cache.partial_dir / "part-99999999999999999999-bad.npz").write_bytes(b"not a zip")
    counter = CountingAlign(monkeypatch)
    with pytest.warns(RuntimeWarning, match="unusable chip checkpoint"):
        resumed = align_images(ids, load, cache_dir=tmp_path, dataset_fingerprint="lfw_ci", progress=False, workers=1)
    assert counter.calls == 3
    assert resumed.ids == ids
    assert np.array_equal(resumed.chips, reference.subset(ids).chips)
    assert not cache.partial_dir.exists()  # checkpoints are merged into the entry and removed


@pytest.mark.parametrize("body, safe", [
    ("print(worker_processes_safe())", False),  # a plain script calling at its top level
    ('if __name__ == "__main__":\n    print(worker_processes_safe())', True),
    ('def run():\n    return worker_processes_safe()\n\nif __name__ == "__main__":\n    print(run())', True),
    ('def run():\n    return worker_processes_safe()\n\nprint(run())', False),
])
def test_worker_processes_are_used_only_where_they_cannot_rerun_the_script(tmp_path, body, safe):
    """Workers (forkserver/spawn) import the main script again: allowed from inside its
    `if __name__ == "__main__":` block, refused (alignment runs in-process) from its top level."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text("from advface_fast.align.dlib_align import worker_processes_safe\n" + body + "\n")
    env = dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(safe)
    code = "from advface_fast.align.dlib_align import worker_processes_safe; print(worker_processes_safe())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120).stdout.strip() == "True"
