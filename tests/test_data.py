"""Tests for advface_fast.data: pairs parsing, strict image decoding, checksums, layouts, .bin files."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from advface_fast.data import (
    PUBLISHED_SHA256,
    DataError,
    LFWNotFoundError,
    Pair,
    load_bin,
    load_lfw,
    parse_pairs,
    parse_pairs_text,
    parse_people,
    probe_image,
    read_image,
    read_rgb,
    read_sha256sums,
    resolve_lfw_path,
    sha256_file,
    write_sha256sums,
)
from advface_fast.data.checksums import parse_sha256sums
from advface_fast.data.insightface_bin import fold_sizes

from conftest import LFW_CI as CI  # noqa: E402  (conftest decides where the test data lives)
from conftest import LFW_FULL as FULL  # noqa: E402
needs_ci = pytest.mark.usefixtures("lfw_ci")  # skipped without the data; failed in CI mode
needs_full = pytest.mark.usefixtures("lfw_full")


# --------------------------------------------------------------------------- helpers


def ci_jpegs() -> list[bytes]:
    files = sorted((CI / "lfw-deepfunneled").glob("*/*.jpg"))
    return [f.read_bytes() for f in files]


def encode(array: np.ndarray, mode: str, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def bad_image(kind: str, good: bytes) -> bytes:
    rgb = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"))
    return {
        "empty": b"",
        "text": b"this is not an image at all\n",
        "truncated_half": good[: len(good) // 2],
        "truncated_tail": good[:-2],
        "grayscale": encode(rgb, "L"),
        "cmyk": encode(rgb, "CMYK"),
        "rgba": encode(rgb, "RGBA", "PNG"),
        "palette": encode(rgb, "P", "PNG"),
    }[kind]


# People and pairs of a small fake tree: 2 folds, 1 matched + 1 mismatched pair per fold.
PEOPLE = {"Alice_Ames": 2, "Bob_Baker": 2, "Cleo_Cruz": 1, "Dan_Dorn": 1}
PAIRS_TEXT = "2\t1\nAlice_Ames\t1\t2\nCleo_Cruz\t1\tDan_Dorn\t1\nBob_Baker\t1\t2\nAlice_Ames\t1\tBob_Baker\t2\n"


def make_tree(root: Path, *, folder: str = "lfw-deepfunneled", pairs_text: str = PAIRS_TEXT,
              pairs_name: str = "pairs.txt", sums: bool = True, replace: dict[str, bytes] | None = None) -> Path:
    """Write a small LFW-like folder from real lfw_ci JPEGs; replace maps image ids to other bytes."""
    jpegs = iter(ci_jpegs())
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for name, count in PEOPLE.items():
        for number in range(1, count + 1):
            image = f"{name}/{name}_{number:04d}"
            path = root / folder / f"{image}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes((replace or {}).get(image, next(jpegs)))
            files.append(path.relative_to(root).as_posix())
    (root / pairs_name).write_text(pairs_text)
    if sums:
        write_sha256sums(root, files + [pairs_name])
    return root


# --------------------------------------------------------------------------- images


@needs_ci
def test_read_rgb_decodes_real_jpeg_from_path_and_bytes():
    path = sorted((CI / "lfw-deepfunneled").glob("*/*.jpg"))[0]
    from_path = read_rgb(path)
    from_bytes = read_rgb(path.read_bytes(), name="x.jpg")
    assert from_path.dtype == np.uint8 and from_path.shape == (250, 250, 3)
    np.testing.assert_array_equal(from_path, from_bytes)


@needs_ci
@pytest.mark.parametrize("kind", ["empty", "text", "truncated_half", "truncated_tail"])
def test_read_rgb_rejects_corrupt_input(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    path.write_bytes(bad_image(kind, ci_jpegs()[0]))
    with pytest.raises(DataError) as info:
        read_rgb(path)
    assert str(path) in str(info.value) and info.value.file == str(path)
    with pytest.raises(DataError):
        probe_image(path)


def test_read_rgb_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="missing") as info:
        read_rgb(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)


@needs_ci
def test_truncated_jpeg_detected_even_if_pil_told_to_load_truncated(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = ci_jpegs()[0]
    # PIL itself would "load" it now, filling the missing part with gray:
    Image.open(io.BytesIO(good[: len(good) // 2])).load()
    with pytest.raises(DataError, match="truncated"):
        read_rgb(good[: len(good) // 2], name="half.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


@needs_ci
@pytest.mark.parametrize("kind,mode", [("grayscale", "L"), ("cmyk", "CMYK"), ("rgba", "RGBA"), ("palette", "P")])
def test_non_rgb_images_error_or_convert(kind, mode):
    data = bad_image(kind, ci_jpegs()[0])
    with pytest.raises(DataError, match=f"mode '{mode}'") as info:
        read_rgb(data, name="odd.jpg")
    assert "odd.jpg" in str(info.value)
    with pytest.raises(DataError, match=f"mode '{mode}'"):
        probe_image(data, name="odd.jpg")
    array, original = read_image(data, name="odd.jpg", convert=True)
    assert original == mode and array.dtype == np.uint8 and array.shape == (250, 250, 3)
    if mode == "L":
        assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])


@needs_ci
def test_probe_image_catches_truncated_png():
    png = encode(np.asarray(Image.open(io.BytesIO(ci_jpegs()[0]))), "RGB", "PNG")
    assert probe_image(png, name="ok.png") == "RGB"
    with pytest.raises(DataError, match="truncated"):
        probe_image(png[:-20], name="cut.png")
    with pytest.raises(DataError):
        read_rgb(png[: len(png) // 2], name="cut.png")


# --------------------------------------------------------------------------- pairs files


def test_parse_pairs_text_folds_and_labels():
    parsed = parse_pairs_text(PAIRS_TEXT, file="p.txt")
    assert (parsed.n_folds, parsed.pairs_per_half) == (2, 1)
    assert parsed.pairs == (
        Pair(1, "Alice_Ames/Alice_Ames_0001", "Alice_Ames/Alice_Ames_0002", True),
        Pair(1, "Cleo_Cruz/Cleo_Cruz_0001", "Dan_Dorn/Dan_Dorn_0001", False),
        Pair(2, "Bob_Baker/Bob_Baker_0001", "Bob_Baker/Bob_Baker_0002", True),
        Pair(2, "Alice_Ames/Alice_Ames_0001", "Bob_Baker/Bob_Baker_0002", False),
    )
    assert parsed.lines == (2, 3, 4, 5)


def test_parse_view1_header_is_one_fold():
    parsed = parse_pairs_text("2\nA_a\t1\t2\nB_b\t3\t4\nA_a\t1\tB_b\t2\nB_b\t1\tA_a\t3\n\n")
    assert parsed.n_folds == 1 and len(parsed.pairs) == 4
    assert [p.same for p in parsed.pairs] == [True, True, False, False]
    assert {p.fold for p in parsed.pairs} == {1}


@pytest.mark.parametrize("header", ["abc", "10\t300\t5", "0\t1", "-1\t2", "2 x", "1.5", ""])
def test_bad_header_is_an_error_even_with_skip(header):
    with pytest.raises(DataError) as info:
        parse_pairs_text(header + "\nA_a\t1\t2\nA_a\t1\tB_b\t2\n", file="p.txt", on_bad="skip")
    assert info.value.line == 1 and "p.txt:1" in str(info.value)


def test_line_count_must_match_header_even_with_skip():
    short = "\n".join(PAIRS_TEXT.splitlines()[:-1])
    with pytest.raises(DataError, match="promises 2 fold"):
        parse_pairs_text(short, file="p.txt", on_bad="skip")
    with pytest.raises(DataError, match="but the file has 5"):
        parse_pairs_text(PAIRS_TEXT + "Alice_Ames\t1\t2\n", file="p.txt")


# (line number, replacement) for a malformed line in PAIRS_TEXT; line 3 is a mismatched slot.
MALFORMED = {
    "too_few_fields": (2, "Alice_Ames\t1"),
    "mismatched_in_matched_slot": (2, "Alice_Ames\t1\tBob_Baker\t2"),
    "matched_in_mismatched_slot": (3, "Cleo_Cruz\t1\t2"),
    "not_a_number": (2, "Alice_Ames\tone\t2"),
    "zero_index": (2, "Alice_Ames\t0\t2"),
    "five_digits": (2, "Alice_Ames\t1\t10000"),
    "same_image_twice": (2, "Alice_Ames\t2\t2"),
    "mismatch_same_person": (3, "Cleo_Cruz\t1\tCleo_Cruz\t2"),
    "path_traversal": (3, "..\t1\tDan_Dorn\t1"),
    "slash_in_name": (3, "Cleo/Cruz\t1\tDan_Dorn\t1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_pair_line_errors_with_file_and_line(case):
    line_no, replacement = MALFORMED[case]
    lines = PAIRS_TEXT.splitlines()
    lines[line_no - 1] = replacement
    text = "\n".join(lines) + "\n"
    with pytest.raises(DataError) as info:
        parse_pairs_text(text, file="p.txt")
    assert info.value.line == line_no and f"p.txt:{line_no}:" in str(info.value)

    parsed = parse_pairs_text(text, file="p.txt", on_bad="skip")
    assert len(parsed.pairs) == 3 and line_no not in parsed.lines
    assert [(s.file, s.line) for s in parsed.skipped] == [("p.txt", line_no)]
    # The dropped line keeps its slot: the following pairs keep their folds and labels.
    assert [(p.fold, p.same) for p in parsed.pairs] == [
        (f, s) for (f, s), n in zip([(1, True), (1, False), (2, True), (2, False)], (2, 3, 4, 5)) if n != line_no
    ]


def test_parse_pairs_file_errors(tmp_path):
    with pytest.raises(DataError, match="missing"):
        parse_pairs(tmp_path / "pairs.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        parse_pairs(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"1\t1\nJos\xe9_X\t1\t2\nA_a\t1\tB_b\t1\n")
    with pytest.raises(DataError, match="UTF-8"):
        parse_pairs(tmp_path / "latin.txt")


def test_parse_people_formats_and_errors(tmp_path):
    (tmp_path / "people.txt").write_text("2\n2\nA_a\t3\nB_b\t1\n1\nC_c\t2\n")
    assert parse_people(tmp_path / "people.txt") == [[("A_a", 3), ("B_b", 1)], [("C_c", 2)]]
    (tmp_path / "dev.txt").write_text("2\nA_a\t3\nB_b\t1\n")
    assert parse_people(tmp_path / "dev.txt") == [[("A_a", 3), ("B_b", 1)]]
    (tmp_path / "bad.txt").write_text("1\n2\nA_a\t3\nB_b\tx\n")
    with pytest.raises(DataError) as info:
        parse_people(tmp_path / "bad.txt")
    assert info.value.line == 4
    (tmp_path / "extra.txt").write_text("1\nA_a\t3\nB_b\t1\n")
    with pytest.raises(DataError, match="extra lines"):
        parse_people(tmp_path / "extra.txt")


@needs_full
def test_full_lfw_protocol_files_parse():
    view2 = parse_pairs(FULL / "pairs.txt")
    assert (view2.n_folds, view2.pairs_per_half, len(view2.pairs)) == (10, 300, 6000)
    assert sum(p.same for p in view2.pairs) == 3000
    for fold in range(1, 11):
        in_fold = [p for p in view2.pairs if p.fold == fold]
        assert len(in_fold) == 600 and sum(p.same for p in in_fold) == 300
    for name, count in (("pairsDevTrain.txt", 2200), ("pairsDevTest.txt", 1000)):
        view1 = parse_pairs(FULL / name)
        assert view1.n_folds == 1 and len(view1.pairs) == count and sum(p.same for p in view1.pairs) == count // 2
        assert sha256_file(FULL / name) == PUBLISHED_SHA256[name]
    assert sha256_file(FULL / "pairs.txt") == PUBLISHED_SHA256["pairs.txt"]
    people = parse_people(FULL / "people.txt")
    assert len(people) == 10 and sum(len(f) for f in people) == 5749
    assert sum(n for fold in people for _, n in fold) == 13233


# --------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("line", ["abc  ./x.jpg", "0" * 64 + "  /etc/passwd", "0" * 64 + "  ./../x", "0" * 64 + "x"])
def test_malformed_sha256sums_line(line):
    with pytest.raises(DataError) as info:
        parse_sha256sums("a" * 64 + "  ./ok.txt\n" + line + "\n", file="SUMS")
    assert info.value.line == 2


def test_sha256sums_conflicting_duplicate():
    with pytest.raises(DataError, match="twice"):
        parse_sha256sums("a" * 64 + "  ./x\n" + "b" * 64 + "  x\n")
    assert parse_sha256sums("A" * 64 + " *./x/y.jpg\n") == {"x/y.jpg": "a" * 64}


# --------------------------------------------------------------------------- the real lfw_ci set


@needs_ci
def test_lfw_ci_counts_and_checksums():
    sums = read_sha256sums(CI / "SHA256SUMS")
    assert len(sums) == 68
    for rel, expected in sums.items():
        assert sha256_file(CI / rel) == expected
    for verify in ("none", "auto", "full"):
        data = load_lfw(CI, verify=verify)
        assert len(data.pairs) == 40 and data.n_folds == 2 and data.folds == (1, 2)
        assert len(data.image_ids) == 66 and len(set(data.image_ids)) == 66
        assert sum(p.same for p in data.pairs) == 20
        assert [sum(p.fold == f for p in data.pairs) for f in (1, 2)] == [20, 20]
        assert data.skipped == [] and data.converted == []
        assert data.layout == "official" and data.name == "lfw_ci" and not data.published_pairs
    assert data.pairs[0] == Pair(1, "Abel_Pacheco/Abel_Pacheco_0001", "Abel_Pacheco/Abel_Pacheco_0004", True)
    image = data.load_image(data.image_ids[0])
    assert image.dtype == np.uint8 and image.shape == (250, 250, 3)
    np.testing.assert_array_equal(image, read_rgb(data.image_path(data.image_ids[0])))
    with pytest.raises(KeyError):
        data.load_image("Nobody/Nobody_0001")


@needs_ci
def test_lfw_ci_fingerprint_is_stable_and_tracks_the_selection():
    fingerprints = {load_lfw(CI, verify=v).fingerprint for v in ("none", "auto", "full")}
    assert len(fingerprints) == 1
    (whole,) = fingerprints
    assert len(whole) == 64 and int(whole, 16) >= 0
    fold1 = load_lfw(CI, folds=[1])
    assert fold1.fingerprint != whole and fold1.folds == (1,) and fold1.n_folds == 2


@needs_ci
def test_fold_selection_is_one_based():
    second = load_lfw(CI, folds=2)
    assert len(second.pairs) == 20 and {p.fold for p in second.pairs} == {2}
    for bad in ([0], [3], [], ["1"], [True]):
        with pytest.raises(ValueError, match=r"1\.\.2"):
            load_lfw(CI, folds=bad)


@needs_ci
def test_tampered_copy_of_lfw_ci_is_caught(tmp_path):
    root = tmp_path / "lfw_ci"
    shutil.copytree(CI, root)
    data = load_lfw(root)
    victim = data.image_path(data.image_ids[0])
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte inside the compressed data still decodes
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_lfw(root)
    assert str(victim) in str(info.value)
    assert len(load_lfw(root, verify="none").pairs) == 40  # no hashing at this level
    using = [k + 2 for k, p in enumerate(data.pairs) if data.image_ids[0] in (p.a, p.b)]  # line numbers
    assert len(using) == 2
    with pytest.warns(UserWarning, match="2 pair"):
        skipped = load_lfw(root, on_bad="skip")
    assert len(skipped.pairs) == 38 and [s.line for s in skipped.skipped] == using
    assert all(data.image_ids[0] in s.reason for s in skipped.skipped)
    # Metadata checksum failures cannot be skipped.
    (root / "pairs.txt").write_text((root / "pairs.txt").read_text().replace("\t1\t4", "\t1\t2", 1))
    with pytest.raises(DataError, match="pairs.txt"):
        load_lfw(root, on_bad="skip")


@needs_ci
def test_full_verification_checks_files_no_pair_uses(tmp_path):
    root = make_tree(tmp_path / "t")
    extra = root / "lfw-deepfunneled" / "Zed_Zee" / "Zed_Zee_0001.jpg"
    extra.parent.mkdir()
    extra.write_bytes(ci_jpegs()[-1])
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS"]
    write_sha256sums(root, files)
    extra.write_bytes(ci_jpegs()[-2])
    assert len(load_lfw(root).pairs) == 4  # auto only hashes the images pairs use
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_lfw(root, verify="full")


# --------------------------------------------------------------------------- layouts and bad images


@needs_ci
@pytest.mark.parametrize("folder", ["lfw", "lfw_funneled", "lfw-deepfunneled"])
def test_image_folder_names_are_detected(tmp_path, folder):
    data = load_lfw(make_tree(tmp_path / "root", folder=folder))
    assert len(data.pairs) == 4 and len(data.image_ids) == 6
    assert data.image_path(data.image_ids[0]).parent.parent.name == folder


@needs_ci
def test_sklearn_lfw_home_layout_and_same_fingerprint(tmp_path):
    official = load_lfw(make_tree(tmp_path / "official"))
    home = make_tree(tmp_path / "scikit_learn_data" / "lfw_home", folder="lfw_funneled")
    for path in (home, home.parent):  # lfw_home itself or scikit-learn's data_home above it
        data = load_lfw(path)
        assert data.layout == "lfw_home" and data.root == home and len(data.pairs) == 4
    # Same pairs and image bytes in another layout: same fingerprint.
    assert data.fingerprint == official.fingerprint


@needs_ci
def test_several_image_folders_need_an_explicit_choice(tmp_path):
    root = make_tree(tmp_path / "r", folder="lfw")
    make_tree(root, folder="lfw_funneled")
    with pytest.raises(DataError, match="images="):
        load_lfw(root)
    chosen = load_lfw(root, images="lfw_funneled")
    assert chosen.image_path("Dan_Dorn/Dan_Dorn_0001").parent.parent.name == "lfw_funneled"


@needs_ci
def test_missing_folder_or_pairs_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image folder"):
        load_lfw(tmp_path / "empty")
    root = make_tree(tmp_path / "r")
    with pytest.raises(DataError, match="available: pairs.txt"):
        load_lfw(root, pairs="pairsDevTest.txt")


@needs_ci
@pytest.mark.parametrize("verify", ["none", "auto", "full"])
def test_missing_image_found_at_load_time(tmp_path, verify):
    root = make_tree(tmp_path / "r")
    (root / "lfw-deepfunneled" / "Bob_Baker" / "Bob_Baker_0002.jpg").unlink()
    with pytest.raises(DataError, match="missing") as info:
        load_lfw(root, verify=verify)
    assert "Bob_Baker_0002.jpg" in str(info.value)
    with pytest.warns(UserWarning, match="2 pair"):
        data = load_lfw(root, verify=verify, on_bad="skip")
    assert len(data.pairs) == 2 and "Bob_Baker/Bob_Baker_0002" not in data.image_ids
    assert [s.line for s in data.skipped] == [4, 5]
    assert all("Bob_Baker/Bob_Baker_0002" in s.reason and s.file.endswith("pairs.txt") for s in data.skipped)


@needs_ci
@pytest.mark.parametrize("kind", ["empty", "text", "truncated_half", "truncated_tail", "grayscale", "cmyk", "rgba"])
@pytest.mark.parametrize("verify", ["auto", "full"])
def test_bad_image_found_at_load_time(tmp_path, kind, verify):
    bad_id = "Cleo_Cruz/Cleo_Cruz_0001"  # used only by the pair on line 3
    root = make_tree(tmp_path / "r", replace={bad_id: bad_image(kind, ci_jpegs()[0])})
    with pytest.raises(DataError) as info:
        load_lfw(root, verify=verify)
    assert "Cleo_Cruz_0001.jpg" in str(info.value)
    with pytest.warns(UserWarning):
        data = load_lfw(root, verify=verify, on_bad="skip")
    assert len(data.pairs) == 3 and [s.line for s in data.skipped] == [3]
    if kind in ("grayscale", "cmyk", "rgba"):
        converted = load_lfw(root, verify=verify, on_bad="convert")
        assert len(converted.pairs) == 4 and converted.skipped == []
        assert [c.action for c in converted.converted] == ["converted"]
        assert "Cleo_Cruz_0001" in converted.converted[0].file
        assert converted.load_image(bad_id).shape == (250, 250, 3)
    else:
        with pytest.raises(DataError):
            load_lfw(root, verify=verify, on_bad="convert")


@needs_ci
def test_bad_image_found_during_the_run_raises(tmp_path):
    bad_id = "Cleo_Cruz/Cleo_Cruz_0001"
    root = make_tree(tmp_path / "r", replace={bad_id: bad_image("truncated_half", ci_jpegs()[0])})
    data = load_lfw(root, verify="none", on_bad="skip")  # "none" does not decode
    assert len(data.pairs) == 4
    with pytest.raises(DataError, match="verify='full'"):
        data.load_image(bad_id)
    gray = make_tree(tmp_path / "g", replace={bad_id: bad_image("grayscale", ci_jpegs()[0])})
    lazy = load_lfw(gray, verify="none", on_bad="convert")
    assert lazy.converted == []
    assert lazy.load_image(bad_id).shape == (250, 250, 3) and len(lazy.converted) == 1
    lazy.load_image(bad_id)
    assert len(lazy.converted) == 1


@needs_ci
def test_image_changed_after_loading_is_caught(tmp_path):
    root = make_tree(tmp_path / "r")
    data = load_lfw(root)
    path = data.image_path("Dan_Dorn/Dan_Dorn_0001")
    path.write_bytes(ci_jpegs()[-1])
    with pytest.raises(DataError, match="changed"):
        data.load_image("Dan_Dorn/Dan_Dorn_0001")


@needs_ci
def test_unlisted_pairs_file_must_match_the_published_one(tmp_path):
    root = make_tree(tmp_path / "r", sums=False)
    with pytest.raises(DataError, match="published LFW pairs.txt"):
        load_lfw(root)
    assert len(load_lfw(root, verify="none").pairs) == 4
    (root / "my_pairs.txt").write_text(PAIRS_TEXT)
    custom = load_lfw(root, pairs="my_pairs.txt")
    assert len(custom.pairs) == 4 and not custom.published_pairs


@needs_ci
def test_users_own_pairs_file_by_path_is_used_with_a_note(tmp_path, monkeypatch):
    """A pairs file named like the published one but different: refused inside the dataset (a changed
    protocol file), used with a note when the user gives it by path; a SHA256SUMS beside it is checked."""
    root = make_tree(tmp_path / "r", sums=False)
    mine = tmp_path / "mine" / "pairs.txt"
    mine.parent.mkdir()
    mine.write_text(PAIRS_TEXT)
    data = load_lfw(root, pairs=str(mine))
    assert len(data.pairs) == 4 and data.pairs_check.startswith("not verified")
    monkeypatch.chdir(tmp_path)
    assert load_lfw(root, pairs="mine/pairs.txt").pairs_file == "mine/pairs.txt"  # relative: to the cwd
    write_sha256sums(mine.parent, ["pairs.txt"])
    assert load_lfw(root, pairs=str(mine)).pairs_check.startswith("verified by")
    mine.write_text(PAIRS_TEXT + "\n")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_lfw(root, pairs=str(mine))
    listed = load_lfw(make_tree(tmp_path / "s"))
    assert listed.pairs_check.startswith("verified by") and listed.pairs_check.endswith("SHA256SUMS")


@needs_ci
def test_without_images_drops_and_records_their_pairs(tmp_path):
    data = load_lfw(make_tree(tmp_path / "r"))
    victim = data.pairs[0].a
    kept = data.without_images({victim: "no face detected"})
    users = [p for p in data.pairs if victim in (p.a, p.b)]
    assert len(kept.pairs) == len(data.pairs) - len(users) and victim not in kept.image_ids
    assert [s.reason.endswith(f"image {victim}: no face detected") for s in kept.skipped] == [True] * len(users)
    assert kept.fingerprint != data.fingerprint and len(data.pairs) == 4  # the original is unchanged


def test_skip_warning_has_its_own_category(tmp_path):
    from advface_fast.data import DataIssue, DataWarning
    from advface_fast.data.lfw import _warn_skipped

    with pytest.warns(DataWarning):
        _warn_skipped("x", [DataIssue("f", 1, "bad")])


@needs_ci
def test_fingerprint_changes_with_images_and_pairs(tmp_path):
    base = load_lfw(make_tree(tmp_path / "a", sums=False, pairs_name="p.txt"), pairs="p.txt")
    same = load_lfw(make_tree(tmp_path / "b", sums=False, pairs_name="p.txt"), pairs="p.txt", verify="none")
    assert base.fingerprint == same.fingerprint
    other_image = load_lfw(
        make_tree(tmp_path / "c", sums=False, pairs_name="p.txt", replace={"Dan_Dorn/Dan_Dorn_0001": ci_jpegs()[-1]}),
        pairs="p.txt",
    )
    assert other_image.fingerprint != base.fingerprint
    swapped = PAIRS_TEXT.replace("Alice_Ames\t1\tBob_Baker\t2", "Alice_Ames\t2\tBob_Baker\t2")
    other_pairs = load_lfw(make_tree(tmp_path / "d", sums=False, pairs_name="p.txt", pairs_text=swapped), pairs="p.txt")
    assert other_pairs.fingerprint != base.fingerprint


def test_bad_arguments():
    with pytest.raises(ValueError, match="verify"):
        load_lfw(".", verify="quick")
    with pytest.raises(ValueError, match="on_bad"):
        load_lfw(".", on_bad="ignore")


# --------------------------------------------------------------------------- path resolution


def test_resolve_lfw_path_order(tmp_path, monkeypatch):
    explicit, from_env, home = tmp_path / "explicit", tmp_path / "env", tmp_path / "home"
    for folder in (explicit, from_env, home / "lfw_home"):
        folder.mkdir(parents=True)
    (home / "lfw_home" / "pairs.txt").write_text("1\t0\n")  # an empty default folder is an unfinished download
    monkeypatch.setenv("ADVFACE_LFW", str(from_env))
    monkeypatch.setenv("ADVFACE_HOME", str(home))
    assert resolve_lfw_path(explicit) == explicit
    assert resolve_lfw_path(None) == from_env
    monkeypatch.delenv("ADVFACE_LFW")
    assert resolve_lfw_path() == home / "lfw_home"
    with pytest.raises(LFWNotFoundError, match="given path"):
        resolve_lfw_path(tmp_path / "nope")


def test_resolve_lfw_path_explains_how_to_get_data(tmp_path, monkeypatch):
    monkeypatch.delenv("ADVFACE_LFW", raising=False)
    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path / "nothing"))
    with pytest.raises(LFWNotFoundError) as info:
        load_lfw()
    message = str(info.value)
    assert "advface download-lfw" in message and "ADVFACE_LFW" in message
    assert str(tmp_path / "nothing" / "lfw_home") in message


@needs_ci
def test_load_lfw_uses_environment_variable(monkeypatch):
    monkeypatch.setenv("ADVFACE_LFW", str(CI))
    assert len(load_lfw().pairs) == 40


# --------------------------------------------------------------------------- InsightFace .bin


def ci_bin_content(n_pairs: int = 20) -> tuple[list[bytes], list[bool]]:
    jpegs = ci_jpegs()
    images = [jpegs[k % len(jpegs)] for k in range(2 * n_pairs)]
    return images, [k % 3 == 0 for k in range(n_pairs)]


def py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's pickle.dump(..., protocol=2) writes: images as 8-bit str (BINSTRING)."""
    out = b"\x80\x02]("
    for data in images:
        out += b"T" + struct.pack("<I", len(data)) + data
    out += b"e]("
    out += b"".join(b"\x88" if same else b"\x89" for same in issame)
    return out + b"e\x86."


@needs_ci
@pytest.mark.parametrize("flavour", ["py3", "py3_protocol2", "numpy", "py2"])
def test_insightface_bin_loads(tmp_path, flavour):
    images, issame = ci_bin_content()
    path = tmp_path / "lfw.bin"
    if flavour == "py3":
        path.write_bytes(pickle.dumps((images, issame), protocol=4))
    elif flavour == "py3_protocol2":
        path.write_bytes(pickle.dumps((images, issame), protocol=2))
    elif flavour == "numpy":
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in images]
        path.write_bytes(pickle.dumps((arrays, np.array(issame)), protocol=pickle.HIGHEST_PROTOCOL))
    else:
        path.write_bytes(py2_pickle(images, issame))
    assert load_bin(path) == (images, issame)
    data = load_lfw(path)
    assert data.layout == "insightface_bin" and data.name == "lfw" and data.n_folds == 10
    assert len(data.pairs) == 20 and [p.same for p in data.pairs] == issame
    assert [sum(p.fold == f for p in data.pairs) for f in range(1, 11)] == [2] * 10
    assert data.pairs[3] == Pair(2, "bin/000006", "bin/000007", issame[3])
    assert len(data.image_ids) == 40
    np.testing.assert_array_equal(data.load_image("bin/000007"), read_rgb(images[7]))
    assert len(load_lfw(path, folds=[1, 10]).pairs) == 4


@needs_ci
def test_insightface_bin_fingerprint(tmp_path):
    images, issame = ci_bin_content()
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(pickle.dumps((images, issame), protocol=4))
    second.write_bytes(py2_pickle(images, issame))  # other serialisation, same data
    assert load_lfw(first).fingerprint == load_lfw(second, verify="none").fingerprint
    second.write_bytes(pickle.dumps((images, [not s for s in issame]), protocol=4))
    assert load_lfw(first).fingerprint != load_lfw(second).fingerprint


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["os.system", "eval", "numpy_subclass"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        evil = ([_RunsShell(f"touch {marker}"), b"x"], [True])
        expected = "posix.system|os.system|nt.system"
    elif payload == "eval":
        evil = ([_Evaluates(), b"x"], [True])
        expected = "(__builtin__|builtins).eval"
    else:  # an allowed numpy reconstructor asked to build something that is not a plain array
        evil = ([np.ma.masked_array([1, 2]), b"x"], [True])
        expected = "numpy.ma"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=f"refused to load global '({expected})") as info:
        load_lfw(path)
    assert "malicious" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (([b"a", b"b", b"c"], [True]), "2 images per pair"),
        (([b"a", b"b"], ["yes"]), "expected a boolean"),
        (([1, b"b"], [True]), "expected encoded image bytes"),
        (([], []), "no pairs"),
        ({"images": []}, "expected a pickled pair"),
    ],
)
def test_malformed_bin_content(tmp_path, content, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DataError, match=match):
        load_bin(path)


def test_not_a_pickle(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="not a readable"):
        load_lfw(path)


@needs_ci
def test_bad_image_inside_bin(tmp_path):
    images, issame = ci_bin_content()
    images[5] = images[5][:100]
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    with pytest.raises(DataError, match=r"bin/000005"):
        load_lfw(path)
    with pytest.warns(UserWarning):
        data = load_lfw(path, on_bad="skip")
    assert len(data.pairs) == 19 and "bin/000005" not in data.image_ids
    assert data.skipped[0].reason.startswith("pair 2:")


@needs_ci
def test_bin_checked_against_sha256sums_next_to_it(tmp_path):
    images, issame = ci_bin_content()
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  ./lfw.bin\n")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_lfw(path)
    write_sha256sums(tmp_path, ["lfw.bin"])
    assert len(load_lfw(path).pairs) == 20


def test_bin_fold_sizes_match_kfold():
    assert fold_sizes(6000) == [600] * 10
    assert fold_sizes(23, 10) == [3, 3, 3] + [2] * 7
    with pytest.raises(ValueError):
        fold_sizes(5, 10)


# --------------------------------------------------------------------------- full LFW (slow)


@pytest.mark.slow
@needs_full
def test_full_lfw_loads_and_verifies():
    data = load_lfw(FULL)
    assert (len(data.pairs), data.n_folds, len(data.image_ids)) == (6000, 10, 7701)
    assert sum(p.same for p in data.pairs) == 3000 and data.published_pairs
    assert data.fingerprint == load_lfw(FULL, verify="none").fingerprint
    assert data.load_image(data.image_ids[-1]).shape == (250, 250, 3)
