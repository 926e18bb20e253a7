"""Every command that reads images, fed every kind of bad image file under the default --on-bad error:
exit status 2 and exactly one line on stderr naming the file and saying what is wrong with it, never
a traceback or a stray warning.

Kinds: an empty file, a text file named .jpg, a truncated JPEG, two decompression bombs under PIL's
REAL default pixel limit (a 20,000 x 20,000 PNG, over twice the limit: PIL raises
DecompressionBombError; a 10,000 x 10,000 one, between the limit and twice it: PIL only warns,
DecompressionBombWarning), a CMYK JPEG and a 16-bit PNG (modes that are not RGB), and a chip of the
wrong size where a command wants fixed-size chips (gallery --aligned, match on such a gallery).
The bombs are tiny on disk (1-bit pixels, all zero, deflated): tens of kB, made in a fraction of a
second; no image is ever decoded in full, every error comes before any heavy work.
"""

from __future__ import annotations

import io
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import write_people  # a people.txt for lfw_ci (its pair folds as people folds)

from advface_fast.cli import main
from advface_fast.data import parse_pairs, write_sha256sums
from advface_fast.train import make_split

PIL_DEFAULT_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # PIL.Image.MAX_IMAGE_PIXELS as PIL ships it
CHIP = 150  # dlib-resnet's input size: the chips of gallery --aligned / match
FAST = ["--quiet", "--workers", "1", "--threads", "1"]
TRAIN_LIMITS = ["--max-identities", "3", "--max-images-per-identity", "2"]

# kind -> a word the one-line error must contain (what is wrong, not only where)
KINDS = {
    "empty": "empty",
    "text": "not a recognised image",
    "truncated": "truncated",
    "bomb": "implausibly large",  # > 2 x the limit: PIL raises DecompressionBombError
    "large": "implausibly large",  # > the limit: PIL only warns (DecompressionBombWarning)
    "cmyk": "mode 'CMYK'",
    "gray16": "mode 'I;16'",
    "wrong_size": f"expected {CHIP}x{CHIP}",
}
LFW_COMMANDS = ("verify", "attack", "defend", "paper", "advtrain")
CHIP_COMMANDS = ("gallery", "match")
CASES = ([(c, k) for c in LFW_COMMANDS for k in KINDS if k != "wrong_size"]  # LFW images are aligned: any size
         + [(c, k) for c in CHIP_COMMANDS for k in KINDS])


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height zero pixels, built row by row (PIL would need a
    byte per pixel in memory to write it): a few dozen kB on disk."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row * 1000) for _ in range(height // 1000)]
                    + [z.compress(row * (height % 1000)), z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_bytes(lfw_ci) -> dict[str, tuple[bytes, str]]:
    """kind -> (file content, suffix). Decodable ones are CHIP x CHIP, so that only the intended fault
    shows (a fixed-size command would otherwise see the size first)."""
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_LIMIT, "the bombs must meet PIL's real default limit"
    face = Image.open(next((lfw_ci / "lfw-deepfunneled").glob("*/*.jpg"))).convert("RGB")
    chip = face.crop((50, 50, 50 + CHIP, 50 + CHIP))
    jpeg = _encoded(chip, "JPEG")
    made = {
        "empty": (b"", ".jpg"),
        "text": (b"these are not the pixels you are looking for\n" * 20, ".jpg"),
        "truncated": (jpeg[: len(jpeg) // 2], ".jpg"),
        "bomb": (bomb_png(20_000, 20_000), ".png"),
        "large": (bomb_png(10_000, 10_000), ".png"),
        "cmyk": (_encoded(chip.convert("CMYK"), "JPEG"), ".jpg"),
        "gray16": (_encoded(Image.fromarray(np.full((CHIP, CHIP), 40_000, np.uint16)), "PNG"), ".png"),
        "wrong_size": (_encoded(chip.resize((CHIP // 2, CHIP // 2)), "PNG"), ".png"),
    }
    assert 20_000 * 20_000 > 2 * PIL_DEFAULT_LIMIT and PIL_DEFAULT_LIMIT < 10_000 * 10_000 < 2 * PIL_DEFAULT_LIMIT
    assert len(made["bomb"][0]) < 100_000 and len(made["large"][0]) < 100_000
    return made


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("advface-home")


@pytest.fixture(autouse=True)
def _env(home, monkeypatch):
    monkeypatch.setenv("ADVFACE_HOME", str(home))
    monkeypatch.delenv("ADVFACE_LFW", raising=False)


@pytest.fixture(scope="module")
def people(lfw_ci, tmp_path_factory) -> Path:
    return write_people(lfw_ci, tmp_path_factory.mktemp("people") / "people.txt")


@pytest.fixture(scope="module")
def victim(lfw_ci, people) -> str:
    """An image that a fold-1 pair uses AND advtrain trains on (test fold 2, TRAIN_LIMITS): one bad
    copy of it concerns every LFW command."""
    split = make_split(lfw_ci, [2], people_file=people, max_identities=3, max_images_per_identity=2)
    in_fold_1 = {i for p in parse_pairs(lfw_ci / "pairs.txt").pairs if p.fold == 1 for i in (p.a, p.b)}
    return next(i for i in split.image_ids if i in in_fold_1)


@pytest.fixture(scope="module")
def bad_lfw(lfw_ci, victim, bad_bytes, tmp_path_factory):
    """kind -> (a copy of lfw_ci whose victim image holds that kind of bad file, the file's path).
    The copy's SHA256SUMS describe it as it is, so only the image content is at fault."""
    made = {}

    def make(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(f"lfw-{kind}") / "lfw"
            shutil.copytree(lfw_ci, root)
            path = root / "lfw-deepfunneled" / f"{victim}.jpg"  # the name a pair gives; content decides the format
            path.write_bytes(bad_bytes[kind][0])
            write_sha256sums(root, ["pairs.txt"] + sorted(p.relative_to(root).as_posix()
                                                          for p in (root / "lfw-deepfunneled").rglob("*.jpg")))
            made[kind] = (root, path)
        return made[kind]

    return make


@pytest.fixture(scope="module")
def good_chip(lfw_ci, tmp_path_factory) -> Path:
    face = Image.open(next((lfw_ci / "lfw-deepfunneled").glob("*/*.jpg"))).convert("RGB")
    path = tmp_path_factory.mktemp("chips") / "good.png"
    face.crop((40, 40, 40 + CHIP, 40 + CHIP)).save(path)
    return path


GALLERY = ["--aligned", "--defense-steps", "1", "--batch-size", "1", "--shard-size", "4", "--precision", "fp32",
           "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def store(good_chip, tmp_path_factory) -> Path:
    """A gallery of one aligned chip, made with the default input rules (which match applies to queries)."""
    out = tmp_path_factory.mktemp("store") / "store"
    assert main(["gallery", "--input", str(good_chip.parent), "--out", str(out), *GALLERY]) == 0
    return out


def _argv(command: str, kind: str, tmp_path: Path, bad_lfw, bad_bytes, people, good_chip, request):
    """(argv, the bad file's path) of the cheapest run of ``command`` that must read the bad file."""
    if command in LFW_COMMANDS:
        root, bad = bad_lfw(kind)
        lfw = ["--lfw", str(root)]
        return {
            "verify": ["verify", *lfw, *FAST],
            "attack": ["attack", *lfw, "--attacks", "fgsm", "--eps", "2", "--no-noise", "--pairs", "4", *FAST],
            "defend": ["defend", *lfw, "--defense", "fgsm", "--attacks", "fgsm", "--pairs", "4", *FAST],
            "paper": ["paper", *lfw, "--pairs", "4", "--transfer-models", "none", "--no-adaptive",
                      "--out", str(tmp_path / "paper"), *FAST],
            "advtrain": ["advtrain", *lfw, "--people-file", str(people), "--test-folds", "2", "--no-eval",
                         "--method", "clean", "--epochs", "0", *TRAIN_LIMITS, *FAST, "--out", str(tmp_path / "run")],
        }[command], bad
    data, suffix = bad_bytes[kind]
    bad = tmp_path / f"bad_{kind}{suffix}"
    bad.write_bytes(data)
    if command == "gallery":
        manifest = tmp_path / "images.csv"
        manifest.write_text(f"id,path\ngood,{good_chip}\nbad,{bad}\n")
        return ["gallery", "--input", str(manifest), "--out", str(tmp_path / "store"), *GALLERY], bad
    store = request.getfixturevalue("store")
    return ["match", "--gallery", str(store), "--query", str(good_chip), str(bad), "--threads", "1"], bad


@pytest.mark.parametrize("command,kind", CASES)
def test_bad_image_is_one_line_naming_the_file(command, kind, tmp_path, capsys, bad_lfw, bad_bytes, people,
                                               good_chip, request):
    argv, bad = _argv(command, kind, tmp_path, bad_lfw, bad_bytes, people, good_chip, request)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"advface {command}: error: ") and str(bad) in line, line
    assert KINDS[kind] in line, line
    # nothing PIL said reached the warnings machinery (a DecompressionBombWarning would be printed to stderr)
    pil = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning) or "PIL" in w.filename]
    assert not pil, [str(w.message) for w in pil]
    if command == "match":  # match has no --on-bad: its remedy names what the user can do there
        assert "--on-bad" not in line and "remove it from --query" in line, line
