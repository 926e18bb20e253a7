"""Tests for advface_fast.data.download against a local HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from advface_fast.data import (
    ChecksumError,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    download_lfw,
    fetch,
    load_lfw,
    read_sha256sums,
    safe_extract_tar,
)

from conftest import LFW_CI as CI  # noqa: E402  (conftest decides where the test data lives)
needs_ci = pytest.mark.usefixtures("lfw_ci")  # skipped without the data; failed in CI mode


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours "Range: bytes=N-" unless server.ignore_range; can cut a body short."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        server = self.server
        range_header = self.headers.get("Range")
        server.log.append((self.path, range_header))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if self.path in server.fail_with:
            self.send_error(server.fail_with[self.path])
            return
        start = 0
        if range_header and not server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut_after.pop(self.path, None)
        if cut is not None:  # promise the whole body, send part of it, drop the connection
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.log, httpd.cut_after, httpd.fail_with, httpd.ignore_range = {}, [], {}, {}, False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve(server, name: str, data: bytes, sha256: str | None = None) -> RemoteFile:
    server.files[f"/{name}"] = data
    return RemoteFile(name, f"{server.url}/{name}", sha256 or hashlib.sha256(data).hexdigest())


def make_tgz(entries: dict[str, bytes], *, extra=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buffer.getvalue()


PAYLOAD = bytes(range(256)) * 1000  # 256 kB, several read chunks


def test_fetch_downloads_and_verifies(server, tmp_path):
    remote = serve(server, "blob.bin", PAYLOAD)
    path = fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "blob.bin.part").exists()
    fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert len(server.log) == 1  # a verified file is not fetched again


def test_fetch_resumes_a_partial_file_with_range(server, tmp_path):
    remote = serve(server, "blob.bin", PAYLOAD)
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:100_000])
    fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.log == [("/blob.bin", "bytes=100000-")]


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.ignore_range = True
    remote = serve(server, "blob.bin", PAYLOAD)
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:100_000])
    fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD  # not the first 100 kB twice
    assert len(server.log) == 1


def test_fetch_retries_a_dropped_connection_and_resumes(server, tmp_path):
    remote = serve(server, "blob.bin", PAYLOAD)
    server.cut_after["/blob.bin"] = 70_000
    fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.log == [("/blob.bin", None), ("/blob.bin", "bytes=70000-")]


def test_fetch_complete_part_file_is_accepted_after_416(server, tmp_path):
    remote = serve(server, "blob.bin", PAYLOAD)
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD)
    fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.log == [("/blob.bin", f"bytes={len(PAYLOAD)}-")]


def test_fetch_checksum_mismatch_raises_and_cleans_up(server, tmp_path):
    remote = serve(server, "blob.bin", PAYLOAD, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="blob.bin"):
        fetch(remote, tmp_path, progress=False, backoff_s=0, retries=3)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()
    assert len(server.log) == 1  # a fresh download with the wrong checksum is not retried


def test_fetch_bad_partial_data_is_redownloaded_from_scratch(server, tmp_path):
    remote = serve(server, "blob.bin", PAYLOAD)
    (tmp_path / "blob.bin.part").write_bytes(b"\xff" * 100_000)  # wrong bytes, right length
    fetch(remote, tmp_path, progress=False, backoff_s=0)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.log == [("/blob.bin", "bytes=100000-"), ("/blob.bin", None)]


def test_fetch_http_errors(server, tmp_path):
    missing = RemoteFile("gone.bin", f"{server.url}/gone.bin", "0" * 64)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(missing, tmp_path, progress=False, backoff_s=0, retries=3)
    assert len(server.log) == 1  # client errors are not retried
    remote = serve(server, "busy.bin", PAYLOAD)
    server.fail_with["/busy.bin"] = 503
    with pytest.raises(DownloadError, match="3 attempt"):
        fetch(remote, tmp_path, progress=False, backoff_s=0, retries=3)
    assert len(server.log) == 4
    assert not (tmp_path / "busy.bin").exists()


def test_fetch_unreachable_server_raises(tmp_path):
    remote = RemoteFile("x.bin", "http://127.0.0.1:9/x.bin", "0" * 64)  # discard port: nothing listens
    with pytest.raises(DownloadError, match="2 attempt"):
        fetch(remote, tmp_path, progress=False, backoff_s=0, retries=2, timeout=5)


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "lfw_funneled/../../evil.txt", "/tmp/advface-evil.txt", "symlink", "hardlink", "device"],
)
def test_safe_extract_rejects_unsafe_members(tmp_path, member):
    extra = []
    entries = {"lfw_funneled/A_a/A_a_0001.jpg": b"ok"}
    if member in ("symlink", "hardlink", "device"):
        info = tarfile.TarInfo("lfw_funneled/link")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[member]
        info.linkname = "/etc/passwd"
        extra.append(info)
    else:
        entries[member] = b"evil"
    archive = tmp_path / "a.tgz"
    archive.write_bytes(make_tgz(entries, extra=extra))
    out = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract_tar(archive, out)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not Path("/tmp/advface-evil.txt").exists()
    assert not (out / "lfw_funneled").exists()  # nothing is written unless every member is safe


def test_safe_extract_corrupt_archive(tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(make_tgz({"x/y": b"1"})[:30])
    with pytest.raises(DownloadError):
        safe_extract_tar(archive, tmp_path / "out")


def _lfw_server_files(server):
    """A tiny LFW: 2 people, one matched and one mismatched pair, in lfw_funneled/."""
    jpegs = [p.read_bytes() for p in sorted((CI / "lfw-deepfunneled").glob("*/*.jpg"))[:3]]
    tgz = make_tgz({
        "lfw_funneled/Ann_Ash/Ann_Ash_0001.jpg": jpegs[0],
        "lfw_funneled/Ann_Ash/Ann_Ash_0002.jpg": jpegs[1],
        "lfw_funneled/Ben_Bo/Ben_Bo_0001.jpg": jpegs[2],
    })
    pairs = b"1\t1\nAnn_Ash\t1\t2\nAnn_Ash\t2\tBen_Bo\t1\n"
    return serve(server, "lfw-funneled.tgz", tgz), [serve(server, "pairs.txt", pairs)]


@needs_ci
def test_download_lfw_end_to_end(server, tmp_path):
    archive, pairs_files = _lfw_server_files(server)
    dest = download_lfw(tmp_path / "lfw_home", archive=archive, pairs_files=pairs_files, progress=False, backoff_s=0)
    assert dest == tmp_path / "lfw_home"
    assert sorted(p.name for p in dest.iterdir()) == ["SHA256SUMS", "lfw_funneled", "pairs.txt"]
    assert set(read_sha256sums(dest / "SHA256SUMS")) == {
        "pairs.txt", "lfw_funneled/Ann_Ash/Ann_Ash_0001.jpg", "lfw_funneled/Ann_Ash/Ann_Ash_0002.jpg",
        "lfw_funneled/Ben_Bo/Ben_Bo_0001.jpg",
    }
    data = load_lfw(dest, verify="full")
    assert data.layout == "lfw_home" and len(data.pairs) == 2 and [p.same for p in data.pairs] == [True, False]
    requests = len(server.log)
    download_lfw(dest, archive=archive, pairs_files=pairs_files, progress=False, backoff_s=0)
    assert len(server.log) == requests  # everything present and verified: nothing fetched


@needs_ci
def test_download_lfw_resumes_archive_and_rejects_bad_checksum(server, tmp_path):
    archive, pairs_files = _lfw_server_files(server)
    dest = tmp_path / "lfw_home"
    dest.mkdir()
    data = server.files["/lfw-funneled.tgz"]
    (dest / "lfw-funneled.tgz.part").write_bytes(data[: len(data) // 3])
    download_lfw(dest, archive=archive, pairs_files=pairs_files, progress=False, backoff_s=0)
    assert ("/lfw-funneled.tgz", f"bytes={len(data) // 3}-") in server.log
    assert not (dest / "lfw-funneled.tgz").exists()  # removed after extraction by default

    wrong = RemoteFile(archive.filename, archive.url, "1" * 64)
    other = tmp_path / "other"
    with pytest.raises(ChecksumError):
        download_lfw(other, archive=wrong, pairs_files=pairs_files, progress=False, backoff_s=0)
    assert not (other / "lfw_funneled").exists()


@needs_ci
def test_download_lfw_refuses_traversal_in_archive(server, tmp_path):
    tgz = make_tgz({"lfw_funneled/A_a/A_a_0001.jpg": b"x", "../../escape.txt": b"!"})
    evil = serve(server, "lfw-funneled.tgz", tgz)
    pairs = [serve(server, "pairs.txt", b"1\t0\n")]
    dest = tmp_path / "a" / "b" / "lfw_home"
    with pytest.raises(UnsafeArchiveError):
        download_lfw(dest, archive=evil, pairs_files=pairs, progress=False, backoff_s=0)
    assert not (tmp_path / "a" / "escape.txt").exists() and not dest.exists()  # no half-made lfw_home
    staging = dest.with_name("lfw_home.download")
    assert not [p for p in staging.iterdir() if p.name.startswith(".extract-")]  # extraction folder removed


def test_download_lfw_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        download_lfw(tmp_path, variant="deep")


def test_failed_download_leaves_no_lfw_home_and_teaches_the_remedy(server, tmp_path, monkeypatch):
    """Offline: no empty lfw_home is left behind (it would pass for LFW next time), the error names
    --lfw / $ADVFACE_LFW / advface download-lfw, and the next run says the download is unfinished."""
    from advface_fast.data import DownloadError, LFWNotFoundError, resolve_lfw_path

    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path))
    monkeypatch.delenv("ADVFACE_LFW", raising=False)
    dead = RemoteFile("pairs.txt", "http://127.0.0.1:9/pairs.txt", "0" * 64)  # port 9: nothing listens
    with pytest.raises(DownloadError) as err:
        download_lfw(pairs_files=[dead], progress=False, retries=1, timeout=2, backoff_s=0)
    message = str(err.value)
    assert "--lfw" in message and "ADVFACE_LFW" in message and "advface download-lfw" in message
    assert not (tmp_path / "lfw_home").exists()
    with pytest.raises(LFWNotFoundError, match="unfinished download"):
        resolve_lfw_path()
    # A folder an older version left empty is not taken for LFW either.
    (tmp_path / "lfw_home").mkdir()
    with pytest.raises(LFWNotFoundError, match="download-lfw"):
        resolve_lfw_path()


@needs_ci
def test_download_after_a_failure_resumes_and_moves_into_place(server, tmp_path):
    archive, pairs_files = _lfw_server_files(server)
    dest = tmp_path / "lfw_home"
    broken = RemoteFile(archive.filename, server.url + "/missing.tgz", archive.sha256)
    with pytest.raises(DownloadError):
        download_lfw(dest, archive=broken, pairs_files=pairs_files, progress=False, backoff_s=0, retries=1)
    assert not dest.exists() and (tmp_path / "lfw_home.download" / "pairs.txt").is_file()
    download_lfw(dest, archive=archive, pairs_files=pairs_files, progress=False, backoff_s=0)
    assert (dest / "lfw_funneled").is_dir() and not (tmp_path / "lfw_home.download").exists()
