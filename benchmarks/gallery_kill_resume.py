"""Crash safety of gallery jobs: kill -9 a running job at random moments N times (default 20),
resuming each time, then compare the store with an uninterrupted run of the same command.

    python benchmarks/gallery_kill_resume.py --kills 20 --out benchmarks/results/gallery_kill_resume.json

The job is tests/test_gallery.py's (the test-only tiny model, synthetic 16x16 chips with --aligned,
planted bad files, PGD-12 at eps 8, shard size 4), so a run takes seconds. A kill lands either
during start-up (imports, planning: a third of them) or while shards are being computed and
committed (after the job took the store's lock, uniformly within an eighth of the job's own work
time divided by 1.2 x the number of kills, so the kills never finish the job). Checked at the end: every id present once, manifest rows
and embedding bytes per id equal to the uninterrupted run, shard contents equal, no temporary or
journal files left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import load_average, run_record, write_json  # noqa: E402
from test_gallery import (  # noqa: E402
    content,
    job_args,
    leftovers,
    plant_bad_files,
    script_cmd,
    subprocess_env,
    wait_for_lock,
    write_chips,
)

from advface_fast.jobs import GalleryStore  # noqa: E402
from advface_fast.jobs.shard_store import read_shard  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9 this many times (default: %(default)s)")
    ap.add_argument("--images", type=int, default=2000, help="good synthetic chips (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=2026, help="seed of the kill moments (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    env = subprocess_env()
    log = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        write_chips(src, args.images, seed=1)
        n_bad = len(plant_bad_files(src))  # bad files and a grayscale image: "bad" rows under --on-bad skip
        extra = ("--defense-steps", "12")
        t0 = time.perf_counter()
        r = subprocess.run(script_cmd(*job_args(src, tmp / "ref", *extra, "--json")), env=env, check=True,
                           capture_output=True, text=True)
        t_ref = time.perf_counter() - t0
        work = json.loads(r.stdout)["this_run"]["seconds"]
        startup = t_ref - work
        out = tmp / "killed"
        kills = attempts = 0
        while kills < args.kills and attempts < 4 * args.kills:
            proc = subprocess.Popen(script_cmd(*job_args(src, out, *extra)), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            start = time.perf_counter()
            if attempts % 3 == 0:
                phase, delay = "start-up", rng.uniform(0.1, startup)
                time.sleep(delay)
            else:
                wait_for_lock(out / ".lock", proc)
                phase, delay = "working", rng.uniform(0.0, work / (1.2 * args.kills))
                time.sleep(delay)
            attempts += 1
            if proc.poll() is not None:
                log.append({"attempt": attempts, "finished_before_kill": True, "returncode": proc.returncode})
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            store = GalleryStore(out)
            done = len(store.done_shards()) if (out / "manifest.sqlite").exists() else 0
            log.append({"kill": kills, "phase": phase, "after_s": round(time.perf_counter() - start, 3),
                        "shards_done": done, "temp_files": len([p for p in out.rglob("*") if p.name.endswith(".tmp")])})
            print(log[-1], flush=True)
        subprocess.run(script_cmd(*job_args(src, out, *extra)), env=env, check=True, capture_output=True)
        a, b = content(tmp / "ref"), content(out)
        n_shards = len(list((tmp / "ref" / "shards").iterdir()))
        shards_equal = True
        for path in sorted((tmp / "ref" / "shards").iterdir()):
            (m1, t1), (m2, t2) = read_shard(path), read_shard(out / "shards" / path.name)
            shards_equal &= m1 == m2 and t1.keys() == t2.keys() and all(t1[n].tobytes() == t2[n].tobytes() for n in t1)
        result = {
            "what": "kill -9 at random moments, resume, compare with an uninterrupted run",
            **run_record(argv),
            "load_average": load_average(), "images": len(b), "planted_bad_or_grayscale": n_bad,
            "shards": len(list((tmp / "ref" / "shards").iterdir())),
            "uninterrupted_seconds": round(t_ref, 2), "job_work_seconds": round(work, 2),
            "kills": kills, "kills_requested": args.kills,
            "kills_with_shards_pending": sum(1 for e in log if "kill" in e and e["shards_done"] < n_shards),
            "ids_equal": set(a) == set(b), "ids": len(b),
            "rows_and_embeddings_equal_per_id": a == b, "shard_contents_equal": shards_equal,
            "leftover_files": [str(p.relative_to(out)) for p in leftovers(out)],
            "log": log,
        }
        result["passed"] = (kills >= args.kills and result["ids_equal"] and result["rows_and_embeddings_equal_per_id"]
                            and shards_equal and not result["leftover_files"])
    write_json(result, args.out)
    print({k: v for k, v in result.items() if k != "log"})
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
