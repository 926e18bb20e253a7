"""Face alignment with dlib: detect, predict 5 landmarks, cut a 150x150 chip with `dlib.get_face_chip`.

Each image walks the detector chain until one finds a face:

- "hog": dlib's HOG frontal face detector;
- "cnn": dlib's MMOD CNN detector (about 1.5 s per 250x250 image on one CPU core, so only a fallback);
- "center": a fixed box, `AlignConfig.center_box`, given as fractions of the image size.

When a detector returns several faces the one whose centre is nearest the image centre is used
(LFW centres the subject). The 5-point shape predictor then runs on that box - the centre box
included, so every chip has the same geometry (eyes and nose where dlib puts them) - and
`dlib.get_face_chip` cuts the chip. Nothing else is done to the pixels.

The default centre box, left/top/right/bottom = (0.268, 0.320, 0.704, 0.752), is the median
nearest-centre HOG box on LFW's 250x250 deep-funneled images: pixels [67, 176) x [80, 188), a
109x108 box a little below the image centre (the same median on the 66 lfw_ci images and on
every 7th of the 7,701 full-LFW pair images). On the full LFW pairs no image needed it: 7,661 took
"hog" and 40 "cnn".
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import dlib
import numpy as np
from tqdm.auto import tqdm

from advface_fast.align.chip_cache import ALIGN_PATHS, AlignedChips, ChipCache, concat_chips, unique_in_order
from advface_fast.cache import default_cache_root
from advface_fast.fileio import sha256_file
from advface_fast.models.assets import model_file

SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"

# Bump when the alignment code changes what it produces, so old caches are not reused.
ALIGN_VERSION = 1

LFW_CENTER_BOX = (0.268, 0.320, 0.704, 0.752)

# Images per task sent to a worker process: big enough to amortise the transfer, small enough
# to keep both cores busy until the end.
BATCH_SIZE = 8


class NoFaceError(RuntimeError):
    """No detector in the chain found a face (only possible when the chain lacks "center")."""


@dataclass(frozen=True)
class AlignConfig:
    """How chips are made. `key()` names every setting, so a changed setting never reuses a cache."""

    size: int = 150
    padding: float = 0.25
    upsample: int = 1
    detector_chain: tuple[str, ...] = ("hog", "cnn", "center")
    center_box: tuple[float, float, float, float] = LFW_CENTER_BOX

    def __post_init__(self):
        chain = tuple(self.detector_chain)
        object.__setattr__(self, "detector_chain", chain)
        object.__setattr__(self, "center_box", tuple(float(v) for v in self.center_box))
        if not chain or len(set(chain)) != len(chain) or any(d not in ALIGN_PATHS for d in chain):
            raise ValueError(f"detector_chain must be distinct names from {ALIGN_PATHS}, got {chain}")
        if self.size < 1 or self.padding < 0 or self.upsample < 0:
            raise ValueError(f"bad size/padding/upsample: {self.size}, {self.padding}, {self.upsample}")
        left, top, right, bottom = self.center_box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ValueError(f"center_box must be fractions left < right, top < bottom, got {self.center_box}")

    def key(self) -> str:
        """Readable string of every setting, e.g. 'v1-size150-pad0.25-up1-hog+cnn+center-box0.268,...'."""
        key = f"v{ALIGN_VERSION}-size{self.size}-pad{self.padding:g}-up{self.upsample}-{'+'.join(self.detector_chain)}"
        if "center" in self.detector_chain:
            key += "-box" + ",".join(f"{v:g}" for v in self.center_box)
        return key

    def model_files(self) -> list[str]:
        """Names of the model files this configuration uses."""
        return [SHAPE_PREDICTOR_FILE] + ([CNN_DETECTOR_FILE] if "cnn" in self.detector_chain else [])

    # The aligner-registry interface (advface_fast.align.registry).
    name = "dlib"  # a class attribute, not a field: key() and equality are unchanged

    def make_aligner(self) -> "DlibAligner":
        return DlibAligner(self)

    def meta(self) -> dict:
        """What the chips depend on besides the dataset (the chip-cache metadata, unchanged since v1)."""
        return {"align": self.key(), "dlib": dlib.__version__, "models": model_identity(self)}


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)  # dlib needs contiguous memory


def nearest_to_center(rects: Sequence[dlib.rectangle], height: int, width: int) -> dlib.rectangle:
    """The rectangle whose centre is nearest the image centre (first one on ties)."""
    cy, cx = (height - 1) / 2, (width - 1) / 2
    return min(rects, key=lambda r: ((r.left() + r.right()) / 2 - cx) ** 2 + ((r.top() + r.bottom()) / 2 - cy) ** 2)


def center_rect(height: int, width: int, box: Sequence[float]) -> dlib.rectangle:
    """`box` (fractions left, top, right, bottom; right/bottom exclusive) as a dlib rectangle."""
    left, top, right, bottom = box
    # dlib rectangles include their right and bottom pixel, hence the -1.
    return dlib.rectangle(round(left * width), round(top * height), round(right * width) - 1, round(bottom * height) - 1)


class DlibAligner:
    """Aligns one image at a time. Not picklable (dlib objects): build one per process.

    `detectors` maps each chain name to a function image -> list of dlib rectangles; tests may
    replace entries to exercise the chain.
    """

    def __init__(self, config: AlignConfig | None = None):
        self.config = config or AlignConfig()
        self.shape_predictor = dlib.shape_predictor(str(model_file(SHAPE_PREDICTOR_FILE)))
        self._hog = None
        self._cnn = None
        self.detectors: dict[str, Callable[[np.ndarray], list]] = {
            "hog": self._detect_hog,
            "cnn": self._detect_cnn,
            "center": self._detect_center,
        }

    def _detect_hog(self, image: np.ndarray) -> list:
        if self._hog is None:
            self._hog = dlib.get_frontal_face_detector()
        return list(self._hog(image, self.config.upsample))

    def _detect_cnn(self, image: np.ndarray) -> list:
        if self._cnn is None:  # loaded on first use: most images never need it
            self._cnn = dlib.cnn_face_detection_model_v1(str(model_file(CNN_DETECTOR_FILE)))
        return [d.rect for d in self._cnn(image, self.config.upsample)]

    def _detect_center(self, image: np.ndarray) -> list:
        return [center_rect(image.shape[0], image.shape[1], self.config.center_box)]

    def locate(self, image: np.ndarray) -> tuple[dlib.rectangle, str]:
        """Face box from the first detector in the chain that finds one, and that detector's name."""
        image = _as_rgb_uint8(image)
        for name in self.config.detector_chain:
            rects = self.detectors[name](image)
            if rects:
                return nearest_to_center(rects, image.shape[0], image.shape[1]), name
        raise NoFaceError(f"no face found by {self.config.detector_chain}")

    def align(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        """(chip uint8 size x size x 3 RGB, detector path) for a uint8 HxWx3 RGB image."""
        image = _as_rgb_uint8(image)
        rect, path = self.locate(image)
        shape = self.shape_predictor(image, rect)
        chip = dlib.get_face_chip(image, shape, size=self.config.size, padding=self.config.padding)
        return np.asarray(chip, dtype=np.uint8), path


# -- batch alignment ------------------------------------------------------------------------------

_worker_aligner = None  # the aligner of this worker process (config.make_aligner())

# How often a worker checks that the process that started the pool is still there.
WATCHDOG_INTERVAL_S = 0.25


def _process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie - killed, not yet reaped by its parent - counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _die_with(owner_pid: int) -> None:
    """Make this worker exit as soon as ``owner_pid`` (the process that created the pool) is gone.

    Workers block on their task queue, and forkserver children keep the forkserver and the
    resource tracker alive, so without this a killed parent (kill -9, a crash) would leave the
    whole group running. Two mechanisms: the kernel's parent-death signal when the owner is the
    direct parent (spawn; Linux), and, for every start method and OS, a watchdog thread that
    polls the owner and calls os._exit.
    """
    if os.getppid() == owner_pid and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if not _process_alive(owner_pid):  # the owner died before the signal was armed
        os._exit(1)

    def watch():
        while _process_alive(owner_pid):
            time.sleep(WATCHDOG_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="advface-parent-watchdog", daemon=True).start()


def _init_worker(config, owner_pid: int | None = None) -> None:
    global _worker_aligner
    if owner_pid is not None:
        _die_with(owner_pid)
    _worker_aligner = config.make_aligner()
    torch = sys.modules.get("torch")
    if torch is not None:  # a torch-based aligner (MTCNN): one thread per worker process, no oversubscription
        torch.set_num_threads(1)


def _align_batch(images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
    return [_worker_aligner.align(image) for image in images]


def _iter_aligned(
    ids: Sequence[str], load_image: Callable[[str], np.ndarray], config, workers: int
) -> Iterator[tuple[str, np.ndarray, str]]:
    """(id, chip, path) for each id, in order. Images are loaded here and aligned in `workers` processes."""
    if workers > 1 and len(ids) > BATCH_SIZE and not worker_processes_safe():
        _note_in_process()
        workers = 1
    if workers <= 1 or len(ids) <= BATCH_SIZE:
        aligner = config.make_aligner()
        for image_id in ids:
            yield image_id, *_align_one(aligner, image_id, load_image)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker,
                               initargs=(config, os.getpid()))
    try:
        pending: deque = deque()
        for start in range(0, len(ids), BATCH_SIZE):
            batch = list(ids[start : start + BATCH_SIZE])
            pending.append((batch, pool.submit(_align_batch, [load_image(i) for i in batch])))
            # Keep a few tasks queued per worker, no more: loaded images are held in memory until aligned.
            while len(pending) > 2 * workers:
                yield from _collect(*pending.popleft())
        while pending:
            yield from _collect(*pending.popleft())
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM, an error, the caller stopped early): stop the workers now
        # instead of letting them finish the queued batches.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Not "fork": a child forked after dlib's CNN detector has run in the parent inherits its
    # thread pool without the threads and hangs on its first CNN detection. A fresh interpreter
    # per worker avoids that; worker_processes_safe() decides when one may be started.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def worker_processes_safe() -> bool:
    """Whether alignment may start worker processes without re-running the caller's program.

    forkserver/spawn workers import the main module again. That is harmless for ``python -m``,
    the console scripts, ``python -c`` and interactive sessions, and for a script whose call
    comes from inside its ``if __name__ == "__main__":`` block. A plain script calling us from
    its top level (like the Python API example in the docs) would run itself again in every worker, so
    alignment then runs in this process instead (same chips, one core).
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return True
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:  # not called from the script's top level (e.g. from a thread it started)
        return True
    return _inside_main_guard(path, frame.f_lineno)


@functools.lru_cache(maxsize=8)
def _main_guard_lines(path: str) -> tuple[tuple[int, int], ...]:
    """Line ranges of the top-level ``if __name__ == "__main__":`` blocks of a script."""
    import ast

    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ()

    def is_guard(test) -> bool:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            return False
        sides = [test.left, test.comparators[0]]
        names = [s.id for s in sides if isinstance(s, ast.Name)]
        consts = [s.value for s in sides if isinstance(s, ast.Constant)]
        return names == ["__name__"] and consts == ["__main__"]

    return tuple((node.lineno, node.end_lineno) for node in tree.body
                 if isinstance(node, ast.If) and is_guard(node.test))


def _inside_main_guard(path: str, line: int) -> bool:
    return any(lo <= line <= hi for lo, hi in _main_guard_lines(path))


_noted = False


def _note_in_process() -> None:
    global _noted
    if not _noted:
        _noted = True
        print("note: aligning in this process (one core): worker processes would re-run the calling script, "
              "which has no `if __name__ == \"__main__\":` guard around this call; add one for parallel alignment",
              file=sys.stderr)


def _align_one(aligner, image_id: str, load_image) -> tuple[np.ndarray, str]:
    try:
        return aligner.align(load_image(image_id))
    except NoFaceError as err:
        raise NoFaceError(f"{image_id}: {err}") from None


def _collect(batch: list[str], future) -> Iterator[tuple[str, np.ndarray, str]]:
    try:
        results = future.result()
    except NoFaceError as err:
        raise NoFaceError(f"one of {batch}: {err}") from None
    for image_id, (chip, path) in zip(batch, results):
        yield image_id, chip, path


def _align_all(
    ids: Sequence[str],
    load_image: Callable[[str], np.ndarray],
    config,
    workers: int,
    progress: bool,
    checkpoint: Callable[[AlignedChips], None] | None = None,
    checkpoint_every: int = 512,
) -> AlignedChips:
    chips = np.empty((len(ids), config.size, config.size, 3), dtype=np.uint8)
    paths: list[str] = []
    counts: Counter = Counter()
    done_at_checkpoint = 0
    with tqdm(total=len(ids), unit="img", desc="align faces", disable=not progress, smoothing=0.05) as bar:
        for row, (image_id, chip, path) in enumerate(_iter_aligned(ids, load_image, config, workers)):
            chips[row] = chip
            paths.append(path)
            counts[path] += 1
            bar.update(1)
            if (row + 1) % BATCH_SIZE == 0:
                bar.set_postfix(counts, refresh=False)
            if checkpoint is not None and row + 1 - done_at_checkpoint >= checkpoint_every:
                checkpoint(AlignedChips(chips[done_at_checkpoint : row + 1], list(ids[done_at_checkpoint : row + 1]),
                                        paths[done_at_checkpoint:]))
                done_at_checkpoint = row + 1
        bar.set_postfix(counts)
    return AlignedChips(chips, list(ids), paths)


@functools.lru_cache(maxsize=None)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # size and mtime_ns only key the memo


def model_identity(config: AlignConfig) -> dict[str, str]:
    """sha256 of each model file `config` uses, keyed by file name."""
    identity = {}
    for name in config.model_files():
        path = model_file(name)
        stat = path.stat()
        identity[name] = _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)
    return identity


def cache_meta(config, dataset_fingerprint: str) -> dict:
    """Everything a chip depends on; the cache key is its hash. ``config`` is any aligner config
    of the registry (``advface_fast.align.registry``): its ``meta()`` names the aligner's settings,
    version and model files, so two aligners never share an entry."""
    return {"kind": "aligned-chips", "dataset": dataset_fingerprint, **config.meta()}


def align_images(
    ids: Iterable[str],
    load_image: Callable[[str], np.ndarray],
    config=None,
    cache_dir: str | Path | None = None,
    dataset_fingerprint: str | None = None,
    progress: bool = True,
    *,
    workers: int | None = None,
    checkpoint_every: int = 512,
) -> AlignedChips:
    """Aligned chips for `ids` (repeats dropped, first-occurrence order), using the chip cache.

    load_image: id -> uint8 HxWx3 RGB image; it runs in this process, so it need not be picklable.
    cache_dir: folder of chip caches, default `default_cache_root() / "chips"`.
    dataset_fingerprint: identifies the image bytes behind the ids; None disables the cache
        (without it a cache could silently serve chips of other images).
    workers: alignment processes, default `os.cpu_count()`; the output does not depend on it.
        Workers are fresh interpreters (forkserver/spawn) that exit as soon as this process is
        gone (even after kill -9). From a plain script without an `if __name__ == "__main__":`
        guard, alignment runs in this process instead (see worker_processes_safe).
    checkpoint_every: with a cache, finished chips are saved every this many images, and a rerun
        after an interruption aligns only what is still missing.

    config: an aligner config from the registry (``make_align_config``), default dlib's ``AlignConfig()``.
    Ids already in the cache entry for (dataset, config, aligner version, model files) are not
    aligned again; new ones are aligned and merged into the entry. Returned chips are a
    read-only memory map of the cache file when the request matches its row order, else a copy.
    """
    config = config or AlignConfig()
    ids = unique_in_order(ids)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if dataset_fingerprint is None:
        return _align_all(ids, load_image, config, workers, progress) if ids else _empty(config)

    cache = ChipCache(cache_dir if cache_dir is not None else default_cache_root() / "chips",
                      cache_meta(config, dataset_fingerprint))
    entry = cache.load()
    parts = ([entry] if entry is not None else []) + cache.load_checkpoints()
    known: set[str] = set()
    kept = []
    for part in parts:  # a checkpoint may repeat ids of the entry or of another checkpoint
        fresh = [i for i in part.ids if i not in known]
        if fresh:
            kept.append(part.subset(fresh))
            known.update(fresh)
    missing = [i for i in ids if i not in known]

    if not missing:
        if entry is not None and len(kept) == 1:
            return entry.subset(ids)
        if not ids:
            return _empty(config)
    else:
        new = _align_all(missing, load_image, config, workers, progress, cache.save_checkpoint, checkpoint_every)
        kept.append(new)
        if progress:
            counts = ", ".join(f"{k}={v}" for k, v in new.path_counts().items())
            print(f"aligned {len(new)} new images ({counts}); cache {cache.dir}", file=sys.stderr)
    try:
        cache.save(kept)
    except OSError as err:
        print(f"warning: could not write chip cache {cache.dir}: {err}", file=sys.stderr)
        return concat_chips(kept).subset(ids)
    cache.clear_checkpoints()
    saved = cache.load()
    if saved is None:  # cannot happen unless the disk misbehaves; fall back to what is in memory
        return concat_chips(kept).subset(ids)
    return saved.subset(ids)


def _empty(config) -> AlignedChips:
    return AlignedChips(np.empty((0, config.size, config.size, 3), np.uint8), [], [])
