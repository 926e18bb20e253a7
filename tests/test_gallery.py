"""Gallery jobs on a tiny model: kill -9 at random moments and resume equals an uninterrupted run
(byte for byte per id, nothing lost, nothing twice, no temp files); 2 torchrun ranks and Ray equal
one process; bad files get rows with reasons; a changed config is refused; match finds the right
ids with faiss and with torch search alike.

Run as a script (``python tests/test_gallery.py ARGS`` = ``advface gallery ARGS`` with the test-only
model "tiny-test" registered), which is how the subprocess and torchrun tests start jobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from advface_fast.jobs import GalleryConfig, GalleryJob, GalleryStore, run_local, search  # noqa: E402
from advface_fast.jobs.match import faiss_available  # noqa: E402
from advface_fast.jobs.shard_store import read_shard  # noqa: E402
from advface_fast.jobs.sharding import make_shards, shards_of_rank  # noqa: E402
from advface_fast.jobs.sources import list_images  # noqa: E402
from advface_fast.precision import resolve_precision  # noqa: E402

TINY = "tiny-test"
SIZE = 16


class TinyFace(nn.Module):
    """A fixed random conv net (seeded): N x 3 x 16 x 16 -> N x 8."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Tanh(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 8))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.net(x - 0.5)


def tiny_spec():
    from advface_fast.models import ModelSpec

    return ModelSpec(name=TINY, build=TinyFace, input_size=(SIZE, SIZE), embedding_dim=8,
                     alignment={"size": SIZE, "padding": 0.25}, description="test-only tiny net")


def tiny_model() -> nn.Module:
    """The tiny net with its spec: a model factory for processes where "tiny-test" is not registered (Ray)."""
    model = TinyFace()
    model.spec = tiny_spec()
    return model


class CrashOnce(TinyFace):
    """TinyFace whose first forward anywhere kills its process (a lost Ray worker / node)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed once")
            os._exit(1)
        return super().forward(x)


def crash_once_model(marker: str) -> nn.Module:
    model = CrashOnce(marker)
    model.spec = tiny_spec()
    return model


def register_tiny() -> None:
    """The test-only registry entry (dlib alignment settings, so a job without --aligned works too)."""
    from advface_fast.models import list_models, register_model

    if TINY not in list_models():
        register_model(tiny_spec())


@pytest.fixture(autouse=True, scope="module")
def tiny_registered():
    """"tiny-test" in the registry for this module's tests only."""
    from advface_fast.models.registry import _REGISTRY

    register_tiny()
    yield
    _REGISTRY.pop(TINY, None)


def write_chips(folder: Path, n: int, seed: int = 0, size: int = SIZE) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        rel = f"person_{i % 7}/img_{i:04d}.png"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        ids.append(rel)
    return ids


def plant_bad_files(folder: Path) -> dict[str, str]:
    """Bad inputs, each with a word its reason must contain."""
    bad = folder / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "empty.jpg").write_bytes(b"")
    good = folder / "person_0" / "img_0000.png"
    (bad / "truncated.png").write_bytes(good.read_bytes()[:60])
    (bad / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (bad / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(bad / "wrong_size.png")
    Image.fromarray(np.full((SIZE, SIZE), 77, np.uint8)).save(folder / "gray.png")  # bad unless --on-bad convert
    return {"bad/empty.jpg": "empty", "bad/truncated.png": "truncated", "bad/garbage.jpg": "not a recognised image",
            "bad/notes.txt": "unsupported format", "bad/wrong_size.png": "expected 16x16",
            "gray.png": "mode 'L' (grayscale)"}


def job_args(src: Path, out: Path, *extra) -> list[str]:
    """A tiny job that records bad files as "bad" rows (--on-bad skip) and goes on."""
    return ["--model", TINY, "--defense", "pgd", "--defense-eps", "8", "--defense-steps", "3", "--input", str(src),
            "--out", str(out), "--aligned", "--shard-size", "4", "--batch-size", "4", "--threads", "1",
            "--seed", "7", "--on-bad", "skip", "--quiet", *extra]


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option`` set to ``value`` (replaced when present, else added)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


def run_cli(args) -> int:
    from advface_fast.cli import main

    return main(["gallery", *args])


def content(out: Path) -> dict:
    """Per id: (manifest row, embedding bytes or None)."""
    store = GalleryStore(out)
    rows = {r[0]: r for r in store.rows()}
    ids, emb = store.embeddings()
    embs = {i: emb[n].tobytes() for n, i in enumerate(ids)}
    assert len(ids) == len(set(ids)), "an id is embedded twice"
    return {i: (r, embs.get(i)) for i, r in rows.items()}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".damaged")
            or p.name.endswith("-journal")]


def wait_for_lock(path: Path, proc, timeout: float = 60.0) -> bool:
    """Until the job holds the store's lock (it has started working: True) or has exited or timed out."""
    import fcntl

    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists():
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except OSError:
                    return True
        time.sleep(0.005)
    return False


def script_cmd(*args) -> list[str]:
    return [sys.executable, str(HERE), *args]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# -- units ------------------------------------------------------------------------------------------

def test_shards_are_sorted_chunks_and_ranks_cover_each_once():
    ids = [f"id{i:03d}" for i in range(23)][::-1]
    shards = make_shards(ids, 5)
    assert [len(s) for s in shards] == [5, 5, 5, 5, 3] and sum(shards, []) == sorted(ids)
    for world in (1, 2, 3, 7):
        owned = sorted(k for r in range(world) for k in shards_of_rank(len(shards), r, world))
        assert owned == list(range(len(shards)))
    with pytest.raises(ValueError):
        make_shards(["a", "a"], 2)


def test_sources_directory_csv_jsonl(tmp_path):
    ids = write_chips(tmp_path / "g", 5)
    assert [r.id for r in list_images(tmp_path / "g")] == sorted(ids)
    (tmp_path / "m.csv").write_text("id,path\nb,g/" + ids[1] + "\na,g/" + ids[0] + "\n")
    refs = list_images(tmp_path / "m.csv")
    assert [r.id for r in refs] == ["a", "b"] and Path(refs[0].path).exists()
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x", "path": "g/" + ids[2]}) + "\n")
    assert [r.id for r in list_images(tmp_path / "m.jsonl")] == ["x"]
    (tmp_path / "dup.csv").write_text("id,path\na,1.png\na,2.png\n")
    with pytest.raises(ValueError, match="repeats line 2"):
        list_images(tmp_path / "dup.csv")


def test_an_lfw_root_lists_its_image_folder(lfw_ci):
    refs = list_images(lfw_ci)
    assert refs and all(r.id.count("/") == 1 and r.id.endswith(".jpg") for r in refs)
    assert all(Path(r.path).is_absolute() and Path(r.path).exists() for r in refs[:5])


def test_faiss_and_torch_search_agree():
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((1000, 16)).astype(np.float32), rng.standard_normal((7, 16)).astype(np.float32)
    s_t, r_t = search(g, q, 5, backend="torch", chunk=96)  # chunked: several merges
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    ref = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ gn.T
    assert np.array_equal(r_t, np.argsort(-ref, axis=1)[:, :5])
    np.testing.assert_allclose(s_t, np.sort(ref, axis=1)[:, ::-1][:, :5], atol=1e-5)
    from conftest import need_module

    need_module("faiss", "pip install 'advface-fast[faiss]'")
    s_f, r_f = search(g, q, 5, backend="faiss")
    assert np.array_equal(r_f, r_t)
    np.testing.assert_allclose(s_f, s_t, atol=1e-5)


# -- the job ------------------------------------------------------------------------------------------

def test_bad_files_are_listed_good_files_embedded_changed_config_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "store"
    good = write_chips(src, 10)
    bad = plant_bad_files(src)
    assert run_cli(job_args(src, out)) == 0
    printed = capsys.readouterr().out
    rows = {r[0]: r for r in GalleryStore(out).rows()}
    assert set(rows) == set(good) | set(bad)
    for image_id, word in bad.items():
        assert rows[image_id][3] == "bad" and word in rows[image_id][4], rows[image_id]
        assert image_id in printed
    assert all(rows[i][3] == "ok" and rows[i][4] is None for i in good)
    ids, emb = GalleryStore(out).embeddings()
    assert sorted(ids) == sorted(good) and emb.shape == (10, 8) and np.isfinite(emb).all()
    assert "bad input" in printed and str(len(bad)) in printed
    # The store's embeddings are D's: equal to a direct AttackAsDefense run on those chips.
    from advface_fast.defenses import AttackAsDefense

    x = torch.stack([torch.from_numpy(np.array(Image.open(src / i).convert("RGB"))).permute(2, 0, 1)
                     for i in ids]).float() / 255
    precision = GalleryStore(out).config()["options"]["precision"]  # --precision auto, resolved and recorded
    assert precision == resolve_precision("auto")
    d = AttackAsDefense(TinyFace().eval().requires_grad_(False), eps=8, steps=(3,), seed=7, batch_size=4,
                        precision=precision)
    defended = d.defend(x, ids)[3]
    with torch.no_grad():
        direct = TinyFace()(defended)
    np.testing.assert_allclose(emb, direct.numpy(), atol=1e-5)
    assert not np.allclose(emb, TinyFace()(x).detach().numpy(), atol=1e-3)  # D did something

    # A rerun of the same command does nothing new; a changed config is refused, naming the change.
    before = content(out)
    assert run_cli(job_args(src, out)) == 0
    assert content(out) == before
    capsys.readouterr()
    for change, word in ((["--seed", "8"], "--seed"), (["--defense-eps", "4"], "--defense-eps"),
                         (["--defense-steps", "2"], "--defense-steps")):
        args = job_args(src, out)
        i = args.index(change[0])
        args[i + 1] = change[1]
        assert run_cli(args) == 2
        err = capsys.readouterr().err
        assert "another config" in err and word in err, err
    (src / "person_0" / "extra.png").write_bytes((src / good[0]).read_bytes())
    assert run_cli(job_args(src, out)) == 2
    assert "set of input images" in capsys.readouterr().err
    assert content(out) == before


def test_a_shard_written_but_not_committed_is_adopted_and_a_damaged_one_redone(tmp_path):
    src, out = tmp_path / "src", tmp_path / "store"
    write_chips(src, 12, seed=5)
    assert run_cli(job_args(src, out)) == 0
    full = content(out)
    shard1 = (out / "shards" / "shard-000001.safetensors").read_bytes()
    # A crash after the rename and before the commit: the file is there, the manifest lacks it.
    con = sqlite3.connect(out / "manifest.sqlite")
    with con:
        con.execute("DELETE FROM images WHERE shard IN (1, 2)")
        con.execute("DELETE FROM shards WHERE shard IN (1, 2)")
    con.close()
    damaged = out / "shards" / "shard-000002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])  # cannot happen with atomic writes; still never trusted
    (out / "shards" / ".shard-000003.safetensors.123.deadbeef.tmp").write_bytes(b"half a shard")
    assert run_cli(job_args(src, out)) == 0
    assert content(out) == full
    assert (out / "shards" / "shard-000001.safetensors").read_bytes() == shard1
    workers = dict(sqlite3.connect(out / "manifest.sqlite").execute("SELECT shard, worker FROM shards"))
    assert workers[1] == "adopted" and workers[2] == "local"
    assert (out / "shards" / "shard-000002.safetensors.damaged").exists()
    assert not (out / "shards" / ".shard-000003.safetensors.123.deadbeef.tmp").exists()


def test_module_entry_point_is_the_gallery_command():
    r = subprocess.run([sys.executable, "-m", "advface_fast.gallery", "--help"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--shard-size" in r.stdout and "torchrun" in r.stdout


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    src = tmp_path / "src"
    write_chips(src, 160, seed=1)
    plant_bad_files(src)
    env = subprocess_env()
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    r = subprocess.run(script_cmd(*job_args(src, ref, "--defense-steps", "12", "--json")), env=env, check=True,
                       capture_output=True, text=True)
    t_ref = time.perf_counter() - t0
    work = json.loads(r.stdout)["this_run"]["seconds"]  # the job's own time, after imports and planning
    startup = t_ref - work
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        proc = subprocess.Popen(script_cmd(*job_args(src, out, "--defense-steps", "12")), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Each kill lands in the imports and planning, or in the first eighth of the work once the job holds
        # its lock, so 6 kills cannot finish the job however fast the machine (a resumed run starts faster
        # than the measured cold start, so a kill timed from the start alone could land after the end).
        if attempt % 3 == 0 and not wait_for_lock(out / ".lock", proc, timeout=rng.uniform(0.1, startup)):
            pass  # killed during imports / planning
        else:
            wait_for_lock(out / ".lock", proc)
            time.sleep(rng.uniform(0.0, work / 8))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            if kills >= 6:
                break
        else:
            assert proc.returncode == 0
            break
    assert kills >= 5, f"only {kills} kills landed while the job ran ({startup:.1f} s start + {work:.1f} s work)"
    done_before = len(GalleryStore(out).done_shards()) if (out / "manifest.sqlite").exists() else 0
    subprocess.run(script_cmd(*job_args(src, out, "--defense-steps", "12")), env=env, check=True,
                   capture_output=True)
    a, b = content(ref), content(out)
    assert set(a) == set(b) and len(a) == 166
    assert a == b  # manifest rows and embedding bytes per id
    for k in range(len(list((ref / "shards").iterdir()))):  # the shard files' content too (safetensors
        name = f"shard-{k:06d}.safetensors"                  # writes its metadata in a random key order)
        (m1, t1), (m2, t2) = read_shard(ref / "shards" / name), read_shard(out / "shards" / name)
        assert m1 == m2 and t1.keys() == t2.keys()
        assert all(t1[n].tobytes() == t2[n].tobytes() for n in t1)
    assert leftovers(out) == []
    con = sqlite3.connect(out / "manifest.sqlite")
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM images").fetchone() == (166, 166)
    print(f"{kills} kills, {done_before} shards done before the last run")


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    pytest.importorskip("torch.distributed")
    src = tmp_path / "src"
    write_chips(src, 30, seed=2)
    plant_bad_files(src)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(job_args(src, one)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), str(HERE), *job_args(src, two)]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert content(one) == content(two)
    runs = sqlite3.connect(two / "manifest.sqlite").execute("SELECT executor, rank, world_size FROM runs").fetchall()
    assert sorted(runs) == [("torchrun", 0, 2), ("torchrun", 1, 2)]
    workers = {w for (w,) in sqlite3.connect(two / "manifest.sqlite").execute("SELECT worker FROM shards")}
    assert workers == {"rank 0/2", "rank 1/2"}
    # Rank 0 refuses a changed config, and every rank stops with it.
    args = job_args(src, two)
    args[args.index("--seed") + 1] = "8"
    r = subprocess.run(cmd[: cmd.index(str(HERE)) + 1] + args, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and r.stderr.count("another config") == 2, r.stderr[-3000:]
    assert content(one) == content(two)


def test_ray_local_equals_one_process(tmp_path):
    from conftest import need_module

    ray = need_module("ray", "pip install 'advface-fast[ray]'")
    from ray import cloudpickle  # Ray's own copy: ship this module's tiny model by value

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = tmp_path / "src"
    write_chips(src, 20, seed=3)
    plant_bad_files(src)
    one, viaray = tmp_path / "one", tmp_path / "ray"
    cfg = GalleryConfig(model=TINY, eps=8, steps=3, seed=7, aligned=True, shard_size=4, batch_size=4, on_bad="skip")
    run_local(GalleryJob(cfg, str(src), str(one), progress=False, model_factory=tiny_model))
    from advface_fast.jobs import run_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}})
    try:
        summary = run_ray(GalleryJob(cfg, str(src), str(viaray), progress=False, model_factory=tiny_model))
        # A worker that dies mid-task (as on a lost node): Ray reruns its task, the store is the same.
        import functools

        marker = tmp_path / "crashed"
        crashy = GalleryJob(cfg, str(src), str(tmp_path / "ray-crash"), progress=False,
                            model_factory=functools.partial(crash_once_model, str(marker)))
        summary2 = run_ray(crashy)
    finally:
        ray.shutdown()
    assert summary["ok"] == 20 and summary["bad"] == 6
    assert content(one) == content(viaray)
    assert marker.exists() and summary2["ok"] == 20
    assert content(one) == content(tmp_path / "ray-crash")


def test_match_defends_queries_and_finds_them(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "store"
    ids = write_chips(src, 12, seed=4)
    assert run_cli(job_args(src, out)) == 0
    from advface_fast.cli import main

    capsys.readouterr()
    # Queries under their gallery ids: D (seeded by id) makes the same defended image, so each
    # query's best match is itself at cosine 1.
    (tmp_path / "q.csv").write_text(f"id,path\n{ids[3]},{src / ids[3]}\n{ids[8]},{src / ids[8]}\n")
    queries = [str(tmp_path / "q.csv"), str(src / ids[5])]
    assert main(["match", "--gallery", str(out), "--query", *queries, "--top-k", "3", "--search", "torch",
                 "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "no calibrated threshold" in printed
    report = json.loads((tmp_path / "m.json").read_text())
    by_query = {r["query"]: r for r in report["results"]}
    assert sorted(by_query) == sorted([ids[3], ids[8], str(src / ids[5])])
    for want in (ids[3], ids[8]):
        r = by_query[want]
        assert r["matches"][0]["id"] == want and r["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert len(r["matches"]) == 3 and r["matches"][1]["score"] < 0.9999
    if faiss_available():  # the test extra installs it; the two searches must agree
        assert main(["match", "--gallery", str(out), "--query", *queries, "--top-k", "3", "--search", "faiss",
                     "--out", str(tmp_path / "mf.json")]) == 0
        via_faiss = json.loads((tmp_path / "mf.json").read_text())
        for a, b in zip(report["results"], via_faiss["results"]):
            assert [m["id"] for m in a["matches"]] == [m["id"] for m in b["matches"]]
            np.testing.assert_allclose([m["score"] for m in a["matches"]], [m["score"] for m in b["matches"]], atol=1e-5)
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"calibration": {"thresholds": [0.5, 0.7]}}))
    assert main(["match", "--gallery", str(out), "--query", *queries, "--threshold-from", str(calib),
                 "--out", str(tmp_path / "m2.json")]) == 0
    report2 = json.loads((tmp_path / "m2.json").read_text())
    assert report2["threshold"] == pytest.approx(0.6) and "mean of 2" in report2["threshold_source"]
    for r, r2 in zip(report["results"], report2["results"]):
        assert [m["id"] for m in r2["matches"][:3]] == [m["id"] for m in r["matches"]]
        assert all(m["accept"] == (m["score"] >= 0.6) for m in r2["matches"])
    # Recorded with the gallery (a rerun of the finished job adds it), match decides with it.
    calib.write_text(json.dumps({"threshold": 0.8}))
    assert run_cli(job_args(src, out, "--threshold-from", str(calib))) == 0
    assert main(["match", "--gallery", str(out), "--query", *queries, "--out", str(tmp_path / "m3.json")]) == 0
    report3 = json.loads((tmp_path / "m3.json").read_text())
    assert report3["threshold"] == 0.8 and "calibration.json" in report3["threshold_source"]
    assert any(m["accept"] for r in report3["results"] for m in r["matches"])


def test_the_on_bad_rule_stops_records_or_converts_and_a_changed_rule_is_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "store"
    good = write_chips(src, 6, seed=6)
    Image.fromarray(np.full((SIZE, SIZE), 77, np.uint8)).save(src / "gray.png")
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3] = 200, 255  # the lower half transparent
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    (src / "bad").mkdir()
    (src / "bad" / "empty.jpg").write_bytes(b"")
    default = job_args(src, out)
    del default[default.index("--on-bad"):default.index("--on-bad") + 2]
    # error (every command's default): one line naming the file, before any work; nothing is recorded
    assert run_cli(default) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("advface gallery: error: ") and "bad/empty.jpg: image file is empty" in line, line
    assert "--on-bad skip" in line
    assert not (out / "config.json").exists() and not (out / "shards").exists()
    # skip: the bad file and the non-RGB ones get "bad" rows with the reason; the rule is in the config
    assert run_cli(with_option(default, "--on-bad", "skip")) == 0
    rows = {r[0]: r for r in GalleryStore(out).rows()}
    assert [rows[i][3] for i in ("bad/empty.jpg", "gray.png", "rgba.png")] == ["bad"] * 3
    assert "mode 'L'" in rows["gray.png"][4] and all(rows[i][3:5] == ("ok", None) for i in good)
    config = GalleryStore(out).config()
    assert config["input"]["on_bad"] == config["options"]["on_bad"] == "skip"
    # another rule for the same store is refused like any changed option
    capsys.readouterr()
    assert run_cli(with_option(default, "--on-bad", "convert")) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "--on-bad: 'skip' -> 'convert'" in err, err
    # convert: grayscale and alpha images are converted (alpha onto white) and their rows say so;
    # a file no conversion mends still stops the job
    conv = tmp_path / "converted"
    assert run_cli(with_option(job_args(src, conv), "--on-bad", "convert")) == 2
    assert "bad/empty.jpg" in capsys.readouterr().err
    (src / "bad" / "empty.jpg").unlink()
    assert run_cli(with_option(job_args(src, conv, "--json"), "--on-bad", "convert")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input"]["on_bad"] == "convert" and (summary["ok"], summary["bad"]) == (8, 0)
    rows = {r[0]: r for r in GalleryStore(conv).rows()}
    assert rows["gray.png"][3:5] == ("ok", "converted L (grayscale) -> RGB")
    assert rows["rgba.png"][3] == "ok" and "alpha composited onto (255, 255, 255)" in rows["rgba.png"][4]
    # a gallery has no pairs: --pairs-file is no gallery option (refused, not ignored)
    with pytest.raises(SystemExit) as stop:
        run_cli(job_args(src, tmp_path / "other", "--pairs-file", str(src / "gray.png")))
    assert stop.value.code == 2 and "unrecognized arguments: --pairs-file" in capsys.readouterr().err


def test_the_no_face_rule_gives_a_no_face_row_a_centre_box_or_an_error(tmp_path, lfw_ci, capsys):
    pytest.importorskip("dlib")
    src = tmp_path / "src"
    src.mkdir()
    faces = sorted((lfw_ci / "lfw-deepfunneled").glob("*/*.jpg"))[:2]
    for p in faces:
        (src / p.name).write_bytes(p.read_bytes())
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(src / "blank.jpg")

    def run_with(no_face: str) -> tuple[int, Path]:
        out = tmp_path / no_face
        return run_cli(with_option([a for a in job_args(src, out) if a != "--aligned"], "--no-face", no_face)), out

    for no_face, want in (("skip", ("no_face", "no face detected")),
                          ("center", ("ok", "no face detected: the centre box is embedded"))):
        code, out = run_with(no_face)
        rows = {r[0]: r for r in GalleryStore(out).rows()}
        assert code == 0 and rows["blank.jpg"][3:5] == want
        assert [rows[p.name][3:5] for p in faces] == [("ok", None), ("ok", None)]
        assert GalleryStore(out).config()["input"]["no_face"] == no_face
    capsys.readouterr()
    code, out = run_with("error")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "blank.jpg: no face detected" in line and "--no-face center" in line, line
    assert GalleryStore(out).done_shards() == set()


if __name__ == "__main__":  # `advface gallery` with the test-only model registered (subprocess / torchrun tests)
    from advface_fast.gallery import main

    register_tiny()

    sys.exit(main())


def defend_report(precision="bf16") -> dict:
    """The parts of an `advface defend` defend.json that hold the calibration of each D."""
    per_step = {"10": {"per_fold": {"1": 0.70, "2": 0.74}}, "40": {"per_fold": {"1": 0.80, "2": 0.84}}}
    return {"model": "dlib-resnet", "config": {"objective": "away-from-self", "seed": 0},
            "precision": {"gradients": precision, "requested": "auto", "decisions": "fp32"},
            "thresholds": {"metric": "cosine", "undefended": {"per_fold": {"1": 0.9}},
                           "defended": [{"defense": "pgd", "defense_eps": 4.0, "full_protocol": True,
                                         "per_step": per_step},
                                        {"defense": "cw", "defense_eps": 4.0, "per_step": {"40": {"per_fold": {"1": 0.5}}}}]}}


def test_threshold_from_a_defend_report_is_that_of_the_gallerys_own_d(tmp_path):
    from advface_fast.jobs.match import read_threshold

    path = tmp_path / "defend.json"
    path.write_text(json.dumps(defend_report()))
    cfg = GalleryConfig(model="dlib-resnet", defense="pgd", eps=4, steps=40, seed=0, precision="bf16")
    t, source = read_threshold(path, cfg)
    assert t == pytest.approx(0.82) and "40 steps" in source and "full protocol" in source
    assert read_threshold(path, dataclasses.replace(cfg, steps=10))[0] == pytest.approx(0.72)
    assert read_threshold(path, dataclasses.replace(cfg, defense="cw"))[0] == pytest.approx(0.5)
    for changed, named in ((dict(precision="fp32"), "precision"), (dict(seed=3), "seed"),
                           (dict(objective="random-direction"), "objective"), (dict(model="sface"), "model")):
        with pytest.raises(ValueError, match=named):
            read_threshold(path, dataclasses.replace(cfg, **changed))
    with pytest.raises(ValueError, match="no calibration of this gallery's D .*it has: pgd eps 4 steps 10/40"):
        read_threshold(path, dataclasses.replace(cfg, steps=20))
    with pytest.raises(ValueError, match="gallery's D"):
        read_threshold(path)


def test_gallery_refuses_a_calibration_of_another_d_before_any_work(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "store"
    write_chips(src, 4, seed=5)
    path = tmp_path / "defend.json"
    path.write_text(json.dumps(defend_report()))
    assert run_cli(job_args(src, out, "--threshold-from", str(path))) == 2
    assert "model: calibrated 'dlib-resnet'" in capsys.readouterr().err and not out.exists()


def test_gallery_and_match_take_any_registered_defense(tmp_path, capsys):
    """A gallery job and match with registered defenses by spec: the store's rows are the defense's own
    embeddings (gaussian-smoothing averages its seeded draws), a query under its gallery id finds itself
    at cosine 1; an unknown spec or a defense that still needs fitting is one clear error before any work."""
    from advface_fast.cli import main
    from advface_fast.defenses import create_defense
    from advface_fast.models import create_model

    src = tmp_path / "src"
    ids = write_chips(src, 6, seed=5)
    for spec in ("jpeg:quality=50", "gaussian-smoothing:sigma=8,samples=3"):
        out = tmp_path / spec.split(":")[0]
        args = with_option(job_args(src, out), "--defense", spec)
        assert run_cli(args) == 0
        store = GalleryStore(out)
        got_ids, emb = store.embeddings()
        assert store.config()["defense"]["defense"] == spec.split(":")[0]
        d = create_defense(spec.split(":")[0], create_model(TINY), seed=7, batch_size=4,
                           **({"quality": 50} if spec.startswith("jpeg") else {"sigma": 8, "samples": 3}))
        x = torch.from_numpy(np.stack([np.asarray(Image.open(src / i)) for i in got_ids])).permute(0, 3, 1, 2)
        ref = d.embed(x.float().div(255), got_ids)["default"].numpy()
        np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        capsys.readouterr()
        assert main(["match", "--gallery", str(out), "--query", str(src / ids[2]), "--top-k", "2", "--search", "torch",
                     "--out", str(tmp_path / "m.json")]) == 0
    for bad, words in (("no-such-defense", "unknown defense"), ("counter-attack", "tau=")):
        capsys.readouterr()
        assert run_cli(with_option(job_args(src, tmp_path / "bad"), "--defense", bad)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[-1] and "Traceback" not in err[-1], err
