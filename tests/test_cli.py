"""`advface verify` / `advface attack` on bad input: the same rules (--on-bad, --no-face, --pairs-file,
--threads) in every command, recorded in the results and summarised in command-line terms; and
clean interruption (kill -9, SIGTERM) of a run that is aligning faces."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advface_fast.cli import main

REPO = Path(__file__).resolve().parents[1]


def _pair_image_ids(pairs_txt: Path) -> list[str]:
    """Image ids used by the pairs, in first-use order."""
    ids = []
    for line in pairs_txt.read_text().splitlines()[1:]:
        f = line.split("\t")
        if len(f) == 3:
            ids += [f"{f[0]}/{f[0]}_{int(f[1]):04d}", f"{f[0]}/{f[0]}_{int(f[2]):04d}"]
        elif len(f) == 4:
            ids += [f"{f[0]}/{f[0]}_{int(f[1]):04d}", f"{f[2]}/{f[2]}_{int(f[3]):04d}"]
    return list(dict.fromkeys(ids))


def _copy_lfw(src: Path, dest: Path) -> list[str]:
    """A copy of lfw_ci (pairs.txt + images, no SHA256SUMS since images will change); returns the ids."""
    dest.mkdir(parents=True)
    shutil.copy(src / "pairs.txt", dest / "pairs.txt")
    shutil.copytree(src / "lfw-deepfunneled", dest / "lfw-deepfunneled")
    return _pair_image_ids(dest / "pairs.txt")


def _write_sums(root: Path) -> None:
    """SHA256SUMS of the copy as it now is (lfw_ci's pairs.txt is not the published one, so a
    dataset copy needs its own checksums, like any user's dataset)."""
    from advface_fast.data import write_sha256sums

    files = ["pairs.txt"] + [p.relative_to(root).as_posix() for p in (root / "lfw-deepfunneled").rglob("*.jpg")]
    write_sha256sums(root, files)


def _path(root: Path, image_id: str) -> Path:
    return root / "lfw-deepfunneled" / f"{image_id}.jpg"


def _rgb(root: Path, image_id: str) -> Image.Image:
    return Image.open(_path(root, image_id)).convert("RGB")


def faceless_jpeg(path: Path) -> None:
    """A flat gray 250x250 JPEG: no detector finds a face in it."""
    Image.new("RGB", (250, 250), (128, 128, 128)).save(path, "JPEG", quality=95)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One ADVFACE_HOME for the module: chips are cached by image content, so every variant of
    the mini dataset aligns only its changed images."""
    return tmp_path_factory.mktemp("advface-home")


@pytest.fixture(autouse=True)
def _env(home, monkeypatch):
    monkeypatch.setenv("ADVFACE_HOME", str(home))
    monkeypatch.delenv("ADVFACE_LFW", raising=False)


@pytest.fixture(scope="module")
def broken_lfw(lfw_ci, tmp_path_factory):
    """lfw_ci with two unreadable images (0 bytes, truncated) and a faceless one; returns (root, {kind: id})."""
    root = tmp_path_factory.mktemp("broken") / "lfw"
    ids = _copy_lfw(lfw_ci, root)
    bad = {"empty": ids[0], "truncated": ids[5], "faceless": ids[9]}
    _path(root, bad["empty"]).write_bytes(b"")
    data = _path(root, bad["truncated"]).read_bytes()
    _path(root, bad["truncated"]).write_bytes(data[: len(data) // 2])
    faceless_jpeg(_path(root, bad["faceless"]))
    _write_sums(root)
    return root, bad


@pytest.fixture(scope="module")
def modes_lfw(lfw_ci, tmp_path_factory):
    """lfw_ci with a CMYK, a grayscale and an RGBA image (decodable, not RGB); returns (root, {kind: id})."""
    root = tmp_path_factory.mktemp("modes") / "lfw"
    ids = _copy_lfw(lfw_ci, root)
    bad = {"cmyk": ids[1], "gray": ids[6], "rgba": ids[11]}
    _rgb(root, bad["cmyk"]).convert("CMYK").save(_path(root, bad["cmyk"]), "JPEG", quality=95)
    _rgb(root, bad["gray"]).convert("L").save(_path(root, bad["gray"]), "JPEG", quality=95)
    rgba = _rgb(root, bad["rgba"]).convert("RGBA")
    rgba.putalpha(255)
    buf = io.BytesIO()
    rgba.save(buf, "PNG")  # PNG bytes under the .jpg name: decoders go by content
    _path(root, bad["rgba"]).write_bytes(buf.getvalue())
    _write_sums(root)
    return root, bad


def _run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr, warnings about the data that reached the warnings
    machinery, which the CLI should have turned into its summary)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err, [w for w in caught if issubclass(w.category, UserWarning) and "skipped" in str(w.message)]


FAST = ["--quiet", "--workers", "1", "--threads", "1"]
ATTACK = ["attack", "--attacks", "fgsm", "--eps", "2", "--no-noise", "--pairs", "4", *FAST]


def test_attack_honours_on_bad_skip(broken_lfw, tmp_path, capsys):
    root, bad = broken_lfw
    code, _, err, _ = _run([*ATTACK, "--lfw", str(root)], capsys)
    assert code == 2 and bad["empty"] in err and "--on-bad skip" in err  # the default stops, naming the file
    code, out, err, dw = _run([*ATTACK, "--lfw", str(root), "--on-bad", "skip", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "table1.json").read_text())
    skipped = " ".join(s["reason"] for s in report["input"]["skipped"])
    assert bad["empty"] in skipped and bad["truncated"] in skipped
    assert report["config"]["on_bad"] == "skip" and report["input"]["on_bad"] == "skip"
    # One summary in command-line terms, no raw warnings speaking the API.
    assert "pair(s) skipped (--on-bad skip" in out and "dataset.skipped" not in out + err and not dw
    assert report["environment"]["torch_threads"] == 1


def test_verify_on_bad_skip_summary_and_records(broken_lfw, tmp_path, capsys):
    root, bad = broken_lfw
    code, out, err, dw = _run(["verify", "--lfw", str(root), "--on-bad", "skip", "--out", str(tmp_path), *FAST], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "verify.json").read_text())
    n_skipped = len(report["input"]["skipped"])
    assert n_skipped >= 2 and report["n_pairs"] == 40 - n_skipped
    assert f"input: {report['n_pairs']} pairs used; {n_skipped} pair(s) skipped" in out
    assert "UserWarning" not in err and "on_bad=" not in out + err and not dw


def test_convert_records_every_conversion(modes_lfw, tmp_path, capsys):
    root, bad = modes_lfw
    code, _, err, _ = _run(["verify", "--lfw", str(root), *FAST], capsys)
    assert code == 2 and "--on-bad convert" in err  # not RGB: the error names the remedy
    code, out, err, _ = _run(["verify", "--lfw", str(root), "--on-bad", "convert", "--out", str(tmp_path), *FAST],
                             capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "verify.json").read_text())
    converted = {Path(c["file"]).name: c["reason"] for c in report["input"]["converted"]}
    assert len(converted) == 3 and report["n_pairs"] == 40 and not report["input"]["skipped"]
    assert "CMYK" in converted[Path(bad["cmyk"]).name + ".jpg"]
    assert "grayscale" in converted[Path(bad["gray"]).name + ".jpg"]
    assert "alpha composited onto (255, 255, 255)" in converted[Path(bad["rgba"]).name + ".jpg"]
    assert report["input"]["alpha_background"] == [255, 255, 255]
    assert "3 image(s) converted to RGB (--on-bad convert)" in out
    assert sum(line.strip().startswith("converted") for line in out.splitlines()) == 3


def test_no_face_is_explicit_counted_and_listed(broken_lfw, tmp_path, capsys):
    root, bad = broken_lfw
    base = ["verify", "--lfw", str(root), "--on-bad", "skip", *FAST]
    # Default: scored on the centre box, and listed per image.
    code, out, err, _ = _run([*base, "--out", str(tmp_path / "center")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "center" / "verify.json").read_text())
    assert report["input"]["no_face_images"] == [{"image": bad["faceless"], "action": "scored on the centre box"}]
    assert report["alignment_paths"]["center"] == 1 and report["input"]["no_face"] == "center"
    assert f"no face {bad['faceless']}: scored on the centre box" in " ".join(out.split())
    # skip: its pairs are dropped and listed.
    code, out, err, _ = _run([*base, "--no-face", "skip", "--out", str(tmp_path / "skip")], capsys)
    assert code == 0, err
    skip = json.loads((tmp_path / "skip" / "verify.json").read_text())
    assert skip["input"]["no_face_images"] == [{"image": bad["faceless"], "action": "pairs skipped"}]
    dropped = [s for s in skip["input"]["skipped"] if "no face detected" in s["reason"]]
    assert dropped and skip["n_pairs"] == report["n_pairs"] - len(dropped)
    assert skip["alignment_paths"]["center"] == 0
    assert "1 image(s) without a detected face, their pairs skipped (--no-face skip)" in out
    # error: stops, naming the image.
    code, _, err, _ = _run([*base, "--no-face", "error"], capsys)
    assert code == 2 and bad["faceless"] in err and "--no-face" in err


def test_help_states_the_defaults(capsys):
    for command in ("verify", "attack"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(center, the default" in text and "(error, the default)" in text
        assert "--threads N" in text and "tasks runnable now" in text and "--pairs-file FILE" in text


def _custom_pairs(lfw_ci: Path, folder: Path) -> Path:
    """Our own pairs file: the first 3 matched and 3 mismatched pairs of each lfw_ci fold."""
    lines = lfw_ci.joinpath("pairs.txt").read_text().splitlines()
    folds, per_half = (int(x) for x in lines[0].split())
    body = []
    for k in range(folds):
        block = lines[1 + 2 * per_half * k : 1 + 2 * per_half * (k + 1)]
        body += block[:3] + block[per_half : per_half + 3]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.txt"  # named like the published file on purpose
    path.write_text(f"{folds}\t3\n" + "\n".join(body) + "\n")
    return path


def test_pairs_file_with_and_without_checksums(lfw_ci, tmp_path, capsys, monkeypatch):
    mine = _custom_pairs(lfw_ci, tmp_path / "mine")
    code, out, err, _ = _run(["verify", "--lfw", str(lfw_ci), "--pairs-file", str(mine),
                              "--out", str(tmp_path / "run"), *FAST], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "verify.json").read_text())
    assert report["n_pairs"] == 12 and report["input"]["pairs_file"] == str(mine)
    assert report["input"]["pairs_check"].startswith("not verified")
    assert "note: pairs file" in out and "not verified" in out
    # A SHA256SUMS beside the file is checked: right -> verified, wrong -> a clear error.
    from advface_fast.data import sha256_file

    (mine.parent / "SHA256SUMS").write_text(f"{sha256_file(mine)}  pairs.txt\n")
    code, out, err, _ = _run(["verify", "--lfw", str(lfw_ci), "--pairs-file", str(mine),
                              "--out", str(tmp_path / "run2"), *FAST], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run2" / "verify.json").read_text())["input"]["pairs_check"].startswith("verified by")
    (mine.parent / "SHA256SUMS").write_text(f"{'0' * 64}  pairs.txt\n")
    code, _, err, _ = _run(["verify", "--lfw", str(lfw_ci), "--pairs-file", str(mine), *FAST], capsys)
    assert code == 2 and "SHA-256 mismatch" in err
    monkeypatch.chdir(mine.parent)  # a bare file name is the file here, not the dataset's pairs.txt
    code, _, err, _ = _run(["verify", "--lfw", str(lfw_ci), "--pairs-file", "pairs.txt", *FAST], capsys)
    assert code == 2 and "SHA-256 mismatch" in err and str(mine) in err
    code, _, err, _ = _run(["verify", "--lfw", str(lfw_ci), "--pairs-file", str(tmp_path / "nope.txt"), *FAST], capsys)
    assert code == 2 and "nope.txt" in err


def test_attack_pairs_count_is_not_a_file(capsys):
    """`advface attack --pairs N` means the first N pairs; a file there gets pointed to --pairs-file."""
    with pytest.raises(SystemExit):
        main(["attack", "--pairs", "my_pairs.txt"])
    assert "--pairs-file FILE" in capsys.readouterr().err


def test_threads_are_set_and_recorded(lfw_ci, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err, _ = _run(["verify", "--lfw", str(lfw_ci), "--folds", "1", "--quiet", "--workers", "1",
                                "--threads", "1", "--out", str(tmp_path)], capsys)
        assert code == 0, err
        env = json.loads((tmp_path / "verify.json").read_text())["environment"]
        assert env["torch_threads"] == 1 and env["threads_chosen"].startswith("requested")
        assert _run(["verify", "--lfw", str(lfw_ci), "--threads", "0"], capsys)[0] == 2
    finally:
        torch.set_num_threads(before)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import advface_fast.threads as threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    # what other processes keep runnable NOW decides, not the lagging 1-minute load average: a machine
    # that just finished a job (load average still high) gets all its cores
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 0.0, 0.0))
    for running, want in ((0, 8), (5, 3), (30, 1)):
        monkeypatch.setattr(threads, "running_elsewhere", lambda r=running: float(r))
        assert threads.default_threads()[0] == want
    # without /proc/stat, the load average is the fallback
    monkeypatch.setattr(threads, "running_elsewhere", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.default_threads()[0] == 8
    monkeypatch.setattr(os, "getloadavg", lambda: (5.4, 0.0, 0.0))
    assert threads.default_threads()[0] == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert threads.default_threads()[0] == 1


def test_running_elsewhere_counts_a_busy_neighbour():
    """A real busy process elsewhere shows up as one more runnable task (this process excluded)."""
    import subprocess
    import sys

    import advface_fast.threads as threads

    idle = threads.running_elsewhere(samples=9)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)
        loaded = threads.running_elsewhere(samples=9)
    finally:
        busy.kill()
        busy.wait()
    assert idle is not None and loaded is not None and loaded >= 1


# -- interruption ---------------------------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find child processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_during_alignment_leaves_no_process_behind(lfw_ci, tmp_path, sig):
    """kill -9 / SIGTERM while the alignment workers run: the forkserver, the workers and the
    resource tracker are all gone within seconds; SIGTERM exits 143 with the interrupt message."""
    env = dict(os.environ, ADVFACE_HOME=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "advface_fast.cli", "verify", "--lfw", str(lfw_ci),
                             "--workers", "2", "--threads", "1", "--quiet"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tree = _descendants(proc.pid)
            # the resource tracker, the forkserver and the two workers it forked
            if len(tree) >= 4:
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(tree) >= 4, "alignment workers never started"
        time.sleep(0.5)  # mid-alignment
        tree = _descendants(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(p) for p in tree):
            time.sleep(0.1)
        assert not [p for p in tree if _running(p)], f"survivors of {tree}"
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "caches keep what was finished" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_rgba_alpha_is_composited_not_dropped():
    from advface_fast.data import read_image

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    array, mode = read_image(buf.getvalue(), convert=True)
    assert mode == "RGBA" and (array == 255).all()  # the white background shows, not the hidden red


def test_offline_first_run_teaches_the_remedy_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """No --lfw, nothing cached, no network: one line naming --lfw / $ADVFACE_LFW / download-lfw,
    and no lfw_home left behind to be mistaken for LFW by the next run."""
    import advface_fast.data.download as download
    from advface_fast.data import DownloadError

    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path))

    def offline(remote, dest_dir, **kwargs):
        Path(dest_dir).joinpath(remote.filename + ".part").write_bytes(b"partial")
        raise DownloadError(f"{remote.url}: failed after 3 attempt(s): <urlopen error [Errno -3] name resolution>")

    monkeypatch.setattr(download, "fetch", offline)
    code, _, err, _ = _run(["verify", *FAST], capsys)
    assert code == 2 and "--lfw PATH" in err and "$ADVFACE_LFW" in err and "advface download-lfw" in err
    assert not (tmp_path / "lfw_home").exists() and (tmp_path / "lfw_home.download").is_dir()
    code, _, err, _ = _run(["verify", "--no-download", *FAST], capsys)
    assert code == 2 and "unfinished download" in err
