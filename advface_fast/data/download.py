"""Download LFW and its pairs files from scikit-learn's public mirrors (figshare).

Partial downloads are kept as <name>.part and resumed with HTTP Range requests; every file is
checked against its published SHA-256 before it is used; the archive is extracted with a
checker that refuses absolute paths, "..", links and special files.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .checksums import SUMS_NAME, sha256_file, write_sha256sums
from .paths import ENV_LFW, default_lfw_path

STAGING_SUFFIX = ".download"
HOW_TO_GET_LFW = (f"If you have LFW already, pass --lfw PATH or set ${ENV_LFW} (load_lfw(path) in Python); "
                  "otherwise rerun `advface download-lfw` when online")

USER_AGENT = "advface-fast"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    url: str
    sha256: str


# URLs and SHA-256 values as published in scikit-learn's LFW fetcher.
SKLEARN_PAIRS_FILES = (
    RemoteFile("pairsDevTrain.txt", "https://ndownloader.figshare.com/files/5976012",
               "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa"),
    RemoteFile("pairsDevTest.txt", "https://ndownloader.figshare.com/files/5976009",
               "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c"),
    RemoteFile("pairs.txt", "https://ndownloader.figshare.com/files/5976006",
               "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592"),
)
SKLEARN_ARCHIVES = {
    "funneled": RemoteFile("lfw-funneled.tgz", "https://ndownloader.figshare.com/files/5976015",
                           "b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a"),
    "original": RemoteFile("lfw.tgz", "https://ndownloader.figshare.com/files/5976018",
                           "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0"),
}
# The folder each archive unpacks to (the same names scikit-learn's lfw_home uses).
ARCHIVE_FOLDERS = {"funneled": "lfw_funneled", "original": "lfw"}


class DownloadError(RuntimeError):
    """A download or extraction failed."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the published SHA-256."""


class UnsafeArchiveError(DownloadError):
    """An archive member would land outside the target folder or is a link/special file."""


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", header or "")
    return int(match.group(1)) if match else None


def _transfer(url: str, part: Path, *, timeout: float, progress: bool, desc: str) -> bool:
    """Download url into part, resuming from its current size. Returns True if it resumed."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            exc.close()
            return True  # nothing left to send: the partial file may be complete; the checksum decides
        raise
    with response:
        resumed = bool(offset) and response.status == 206
        if resumed and _content_range_start(response.headers.get("Content-Range")) != offset:
            part.unlink()
            raise ConnectionError("server answered a different byte range; starting over")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        start = offset if resumed else 0  # a 200 answer to a Range request is the whole file
        total = None if expected is None else start + expected
        written = 0
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if expected is not None and written < expected:
        raise ConnectionError(f"connection closed after {written} of {expected} bytes")
    return resumed


def fetch(remote: RemoteFile, dest_dir: str | os.PathLike, *, retries: int = 3, timeout: float = 60.0,
          progress: bool = True, backoff_s: float = 2.0) -> Path:
    """Download remote into dest_dir/remote.filename and check its SHA-256; return the path.

    A file already there with the right checksum is kept. Network failures are retried (with
    exponential backoff) and resume from the .part file; a checksum mismatch after a resumed
    download retries once from scratch (the old partial data may have been bad); a mismatch of a
    fresh download raises ChecksumError at once. HTTP 4xx errors other than 408/429 are not retried.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / remote.filename
    expected = remote.sha256.lower()
    if target.is_file() and sha256_file(target) == expected:
        return target
    part = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, max(1, retries) + 1):
        if attempt > 1 and backoff_s > 0:
            time.sleep(backoff_s * 2 ** (attempt - 2))
        try:
            resumed = _transfer(remote.url, part, timeout=timeout, progress=progress, desc=remote.filename)
        except urllib.error.HTTPError as exc:
            if exc.code in (408, 429) or exc.code >= 500:
                last_error = exc
                continue
            raise DownloadError(f"{remote.url}: HTTP {exc.code} {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, short reads
            last_error = exc
            continue
        actual = sha256_file(part)
        if actual == expected:
            os.replace(part, target)
            return target
        part.unlink()
        last_error = ChecksumError(f"{remote.filename} from {remote.url}: SHA-256 {actual}, expected {expected}")
        if not resumed:
            raise last_error
    if isinstance(last_error, ChecksumError):
        raise last_error
    raise DownloadError(f"{remote.url}: failed after {max(1, retries)} attempt(s): {last_error}")


def _check_member(member: tarfile.TarInfo, base: Path) -> None:
    name = member.name
    posix = PurePosixPath(name.replace("\\", "/"))
    if not name or posix.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in posix.parts:
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path or '..'; refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {name!r} is a link or special file; refusing to extract")
    target = (base / posix).resolve()
    if target != base and base not in target.parents:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {base}")


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract a (gzipped) tar into dest after checking every member; return the top-level names.

    Nothing is written unless every member passes. Where Python offers it, tarfile's "data"
    filter is applied as well.
    """
    base = Path(dest)
    base.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, base)
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(base, members=members, **extra)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, getattr(tarfile, "FilterError", ())):
            raise UnsafeArchiveError(f"{archive}: {exc}") from None
        raise DownloadError(f"{archive}: cannot extract ({exc})") from None
    return sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})


def _extract_folder(archive: Path, dest: Path, folder: str) -> Path:
    # Extract next to the target and move the folder in only when complete, so an interrupted
    # extraction never leaves a half-filled image folder that would pass for a finished one.
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        top = safe_extract_tar(archive, staging)
        if not (staging / folder).is_dir():
            raise DownloadError(f"{archive}: expected a top-level folder {folder!r}, found {top}")
        os.replace(staging / folder, dest / folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest / folder


def download_lfw(dest: str | os.PathLike | None = None, *, variant: str = "funneled",
                 archive: RemoteFile | None = None, pairs_files: Sequence[RemoteFile] | None = None,
                 retries: int = 3, timeout: float = 60.0, progress: bool = True, keep_archive: bool = False,
                 write_checksums: bool = True, backoff_s: float = 2.0) -> Path:
    """Fetch LFW into dest (default: default_lfw_path()) in scikit-learn's lfw_home layout.

    variant: "funneled" (lfw-funneled.tgz -> lfw_funneled/) or "original" (lfw.tgz -> lfw/).
    archive, pairs_files: override the mirrors (URL, file name, SHA-256), e.g. for a local copy.
    The image folder is only downloaded when missing. A dest that does not exist yet is filled
    under <dest>.download and renamed when complete, so a failure leaves no dest behind (and a
    rerun resumes); a failure raises DownloadError saying how to get LFW otherwise. When it was extracted here (from an
    archive whose checksum matched), a SHA256SUMS over the pairs files and the images is written,
    so later loads verify and fingerprint it like the official layout. Returns dest.
    """
    if variant not in SKLEARN_ARCHIVES:
        raise ValueError(f"variant must be one of {sorted(SKLEARN_ARCHIVES)}, got {variant!r}")
    dest = Path(dest).expanduser() if dest is not None else default_lfw_path()
    # A new dataset folder is filled under <dest>.download and moved into place only when complete:
    # a failed or interrupted download never leaves a dest that passes for LFW, and the next call
    # resumes from the partial files kept there.
    work = dest if dest.exists() else dest.with_name(dest.name + STAGING_SUFFIX)
    try:
        _download_into(work, variant=variant, archive=archive, pairs_files=pairs_files, retries=retries,
                       timeout=timeout, progress=progress, keep_archive=keep_archive,
                       write_checksums=write_checksums, backoff_s=backoff_s)
    except DownloadError as exc:
        kept = f"; partial files are kept in {work} and the next download resumes from them" if work.exists() else ""
        raise type(exc)(f"could not download LFW: {exc}{kept}. {HOW_TO_GET_LFW}") from None
    if work != dest:
        os.replace(work, dest)
    return dest


def _download_into(dest: Path, *, variant, archive, pairs_files, retries, timeout, progress, keep_archive,
                   write_checksums, backoff_s) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    archive = archive or SKLEARN_ARCHIVES[variant]
    pairs_files = SKLEARN_PAIRS_FILES if pairs_files is None else tuple(pairs_files)
    options = dict(retries=retries, timeout=timeout, progress=progress, backoff_s=backoff_s)
    for remote in pairs_files:
        fetch(remote, dest, **options)
    folder = dest / ARCHIVE_FOLDERS[variant]
    if folder.is_dir():
        return
    archive_path = fetch(archive, dest, **options)
    _extract_folder(archive_path, dest, folder.name)
    if not keep_archive:
        archive_path.unlink()
    if write_checksums:
        images = [p.relative_to(dest).as_posix() for p in folder.rglob("*") if p.is_file()]
        write_sha256sums(dest, [r.filename for r in pairs_files] + images, dest / SUMS_NAME)
