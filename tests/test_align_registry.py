"""The aligner registry: model alignment dicts -> configs, chip-cache keys per aligner, the MTCNN
centre-box fallback and the --no-face policy on an MTCNN model (sface)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_CI, missing, need_module
from advface_fast.align import (AlignConfig, ChipCache, MtcnnAlignConfig, NoFaceError, align_images, cache_meta,
                                make_align_config)
from advface_fast.align.registry import align_settings, center_chip
from advface_fast.cache import config_key
from advface_fast.models import get_model_spec

IMAGES = LFW_CI / "lfw-deepfunneled"


def need_mtcnn_weights():
    from advface_fast.align.mtcnn import weights_dir

    try:
        weights_dir()
    except ModuleNotFoundError as err:
        missing(str(err))


def _load(image_id: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / image_id).convert("RGB"))


def _flat(_image_id: str = "") -> np.ndarray:
    return np.full((250, 250, 3), 128, np.uint8)


def test_dlib_is_the_default_and_keeps_its_pre_registry_cache_key():
    dlib = need_module("dlib")
    from advface_fast.align.dlib_align import model_identity

    config = make_align_config(get_model_spec("dlib-resnet").alignment)
    assert isinstance(config, AlignConfig) and config == AlignConfig(size=150, padding=0.25)
    assert make_align_config({"aligner": "dlib", "size": 150, "padding": 0.25}) == config
    assert config.name == "dlib" and config.size == 150
    # The metadata (hence every existing dlib chip cache key) is exactly what it was before the registry.
    legacy = {"kind": "aligned-chips", "dataset": "scheme", "align": config.key(), "dlib": dlib.__version__,
              "models": model_identity(config)}
    assert cache_meta(config, "scheme") == legacy
    assert ChipCache("unused", cache_meta(config, "scheme")).key == config_key(**legacy)
    assert config.key() == "v1-size150-pad0.25-up1-hog+cnn+center-box0.268,0.32,0.704,0.752"


def test_mtcnn_config_from_the_sface_spec_and_bad_settings():
    config = make_align_config(get_model_spec("sface").alignment)
    assert isinstance(config, MtcnnAlignConfig)
    assert (config.name, config.size, config.template, config.center_fallback) == ("mtcnn", 112, "arcface", True)
    assert make_align_config(align_settings(config)) == config
    assert config.key().startswith(config.mtcnn_config().key())
    assert MtcnnAlignConfig(center_fallback=False).key() != config.key()
    assert MtcnnAlignConfig(size=160, template="facenet").key() != config.key()
    with pytest.raises(ValueError, match="unknown aligner 'sift'.*dlib, mtcnn"):
        make_align_config({"aligner": "sift"})
    with pytest.raises(ValueError, match="bad settings for aligner 'mtcnn'"):
        make_align_config({"aligner": "mtcnn", "padding": 0.25})
    with pytest.raises(ValueError, match="template"):
        make_align_config({"aligner": "mtcnn", "template": "nope"})


@pytest.mark.usefixtures("lfw_ci")
def test_chip_cache_keeps_aligners_apart(tmp_path):
    need_module("dlib")
    need_mtcnn_weights()
    ids = sorted(str(p.relative_to(IMAGES)) for p in IMAGES.glob("*/*.jpg"))[:2]
    dlib_cfg = make_align_config({"size": 150, "padding": 0.25})
    mtcnn_cfg = make_align_config({"aligner": "mtcnn", "size": 150, "template": "arcface"})  # same chip size
    meta_d, meta_m = cache_meta(dlib_cfg, "data"), cache_meta(mtcnn_cfg, "data")
    assert meta_m["aligner"] == "mtcnn" and set(meta_m["models"]) == {"pnet.pt", "rnet.pt", "onet.pt"}
    key_d, key_m = ChipCache(tmp_path, meta_d).key, ChipCache(tmp_path, meta_m).key
    assert key_d != key_m

    a = align_images(ids, _load, dlib_cfg, tmp_path, "data", progress=False, workers=1)
    b = align_images(ids, _load, mtcnn_cfg, tmp_path, "data", progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key_d, key_m])
    assert a.paths == ["hog", "hog"] and b.paths == ["mtcnn", "mtcnn"]
    assert a.chips.shape == b.chips.shape == (2, 150, 150, 3)
    assert np.abs(a.chips.astype(int) - b.chips.astype(int)).mean() > 5  # different geometry, not one entry
    # Each entry reloads its own chips.
    again = align_images(ids, _load, mtcnn_cfg, tmp_path, "data", progress=False, workers=1)
    assert (np.asarray(again.chips) == np.asarray(b.chips)).all()


def test_mtcnn_centre_fallback_and_strict_mode(tmp_path):
    need_mtcnn_weights()
    config = MtcnnAlignConfig()
    chip, path = config.make_aligner().align(_flat())
    assert path == "center" and chip.shape == (112, 112, 3)
    # The fallback is the centre box resized, nothing else.
    image = np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    from advface_fast.align.mtcnn import crop_box

    box = center_chip(image, 112)  # LFW_CENTER_BOX on 250 x 250: pixels [67, 176) x [80, 188)
    assert box.shape == (112, 112, 3) and (box == crop_box(image, (67, 80, 175, 187), 112)).all()
    assert abs(box.astype(float).mean() - image[80:188, 67:176].mean()) < 2
    strict = MtcnnAlignConfig(center_fallback=False)
    with pytest.raises(NoFaceError, match="flat-0001"):
        align_images(["flat-0001"], _flat, strict, tmp_path, "data", progress=False, workers=1)
    chips = align_images(["flat-0001"], _flat, config, tmp_path, "data", progress=False, workers=1)
    assert chips.paths == ["center"] and chips.path_counts()["center"] == 1


@pytest.fixture(scope="module")
def faceless_lfw(lfw_ci, tmp_path_factory):
    """lfw_ci with one image replaced by a flat grey one; returns (root, faceless id)."""
    from advface_fast.data import write_sha256sums

    root = tmp_path_factory.mktemp("faceless") / "lfw"
    root.mkdir()
    shutil.copy(lfw_ci / "pairs.txt", root / "pairs.txt")
    shutil.copytree(lfw_ci / "lfw-deepfunneled", root / "lfw-deepfunneled")
    victim = sorted((root / "lfw-deepfunneled").glob("*/*.jpg"))[0]
    Image.new("RGB", (250, 250), (128, 128, 128)).save(victim, "JPEG", quality=95)
    files = ["pairs.txt"] + [p.relative_to(root).as_posix() for p in (root / "lfw-deepfunneled").rglob("*.jpg")]
    write_sha256sums(root, files)
    return root, victim.relative_to(root / "lfw-deepfunneled").with_suffix("").as_posix()


def test_no_face_policy_applies_to_mtcnn_models(faceless_lfw, tmp_path):
    need_mtcnn_weights()
    from advface_fast.data import DataError
    from advface_fast.data.policy import InputPolicy
    from advface_fast.pair_chips import prepare_pairs

    root, faceless = faceless_lfw
    kw = dict(cache_dir=tmp_path, workers=1, progress=False)
    center = prepare_pairs(root, "sface", policy=InputPolicy(no_face="center"), **kw)
    assert center.no_face == {faceless: "scored on the centre box"}
    counts = center.alignment_paths()
    assert counts["center"] == 1 and counts["mtcnn"] == len(center.dataset.image_ids) - 1
    assert center.chips.chips.shape[1:] == (112, 112, 3)
    skip = prepare_pairs(root, "sface", policy=InputPolicy(no_face="skip"), **kw)
    assert skip.no_face == {faceless: "pairs skipped"} and 0 < len(skip) < len(center)
    with pytest.raises(DataError, match="no face detected in 1 image"):
        prepare_pairs(root, "sface", policy=InputPolicy(no_face="error"), **kw)
    # Same images, dlib-resnet: its own chips (150 x 150) in another cache entry.
    dlib_pairs = prepare_pairs(root, "dlib-resnet", policy=InputPolicy(no_face="center"), **kw)
    assert dlib_pairs.chips.chips.shape[1:] == (150, 150, 3)
    assert len([p for p in Path(tmp_path).iterdir() if p.is_dir()]) == 2
