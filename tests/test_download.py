import gzip
import hashlib
import io
import logging
import os
import re
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from archives import file_url, md5_of

from ssr.data.download import atomic_dir, download, extract, fetch_archive
from ssr.data.layout import DatasetError


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def payload(tmp_path):
    """A 3.5 MiB source file (several download chunks) and its bytes."""
    data = np.random.default_rng(0).integers(0, 256, 3_500_000, dtype=np.uint8).tobytes()
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    return src, data


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- download, file://

def test_download_verifies_and_renames(tmp_path, payload):
    src, data = payload
    dest = tmp_path / "out" / "blob.bin"
    assert download(file_url(src), dest, _md5(data), progress=False) == dest
    assert dest.read_bytes() == data
    assert not dest.with_suffix(".bin.part").exists()


def test_resume_reads_only_the_rest(tmp_path, payload, caplog):
    src, data = payload
    dest = tmp_path / "blob.bin"
    n = 1_234_567
    # The .part holds bytes that differ from the source: the result keeps them only
    # if the download really continued at byte n instead of reading from 0.
    junk = bytes(n)
    dest.with_suffix(".bin.part").write_bytes(junk)
    with caplog.at_level(logging.INFO, logger="ssr.data.download"):
        download(file_url(src), dest, _md5(junk + data[n:]), progress=False)
    assert dest.read_bytes() == junk + data[n:]
    assert f"resuming at byte {n}" in caplog.text


def test_complete_part_is_verified_not_downloaded(tmp_path, payload):
    src, data = payload
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data)
    download(file_url(src), dest, _md5(data), progress=False)
    assert dest.read_bytes() == data


def test_checksum_mismatch_names_file_and_sums(tmp_path, payload):
    src, data = payload
    dest = tmp_path / "blob.bin"
    with pytest.raises(DatasetError) as err:
        download(file_url(src), dest, "0" * 32, progress=False)
    message = str(err.value)
    assert "blob.bin" in message and "0" * 32 in message and _md5(data) in message
    assert not dest.exists() and not dest.with_suffix(".bin.part").exists()


def test_existing_final_file_is_not_downloaded_again(tmp_path, payload):
    _, data = payload
    dest = tmp_path / "blob.bin"
    dest.write_bytes(data)
    url = file_url(tmp_path / "no-such-dir" / "blob.bin")
    assert download(url, dest, _md5(data), progress=False) == dest


def test_existing_final_file_with_wrong_checksum_is_replaced(tmp_path, payload):
    src, data = payload
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    download(file_url(src), dest, _md5(data), progress=False)
    assert dest.read_bytes() == data


def test_missing_source_names_the_url(tmp_path):
    url = file_url(tmp_path / "nothing.tar")
    with pytest.raises(DatasetError, match="nothing.tar"):
        download(url, tmp_path / "x.tar", "0" * 32, progress=False)
    assert not (tmp_path / "x.tar").exists()


def test_malformed_md5_is_rejected(tmp_path, payload):
    src, _ = payload
    with pytest.raises(ValueError, match="32 hex"):
        download(file_url(src), tmp_path / "x", "abc", progress=False)


# ---------------------------------------------------------------- download, http:// (localhost)

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        data = server.data
        requested = self.headers.get("Range")
        server.requests.append(requested)
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        if match and server.support_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            start = 0
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            # Promise the whole body, send part of it, hang up: a dropped connection.
            body = body[: server.cut_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(payload):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.data, server.requests, server.support_range, server.cut_after = payload[1], [], True, None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/blob.bin"


def test_http_resume_sends_a_range_request(tmp_path, payload, http_server):
    _, data = payload
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data[:1_000_000])
    download(_url(http_server), dest, _md5(data), progress=False)
    assert dest.read_bytes() == data
    assert http_server.requests == ["bytes=1000000-"]


def test_http_server_ignoring_range_restarts_from_zero(tmp_path, payload, http_server):
    _, data = payload
    http_server.support_range = False
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(b"x" * 5_000_000)  # longer than the file: must be cut
    download(_url(http_server), dest, _md5(data), progress=False)
    assert dest.read_bytes() == data


def test_http_complete_part_answered_416_is_verified(tmp_path, payload, http_server):
    _, data = payload
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data)
    download(_url(http_server), dest, _md5(data), progress=False)
    assert dest.read_bytes() == data


def test_interrupted_http_download_keeps_part_then_resumes(tmp_path, payload, http_server):
    _, data = payload
    dest = tmp_path / "blob.bin"
    part = dest.with_suffix(".bin.part")
    http_server.cut_after = 2_000_000
    with pytest.raises(DatasetError, match="run again to resume"):
        download(_url(http_server), dest, _md5(data), progress=False)
    assert not dest.exists()
    assert part.stat().st_size == 2_000_000
    http_server.cut_after = None
    download(_url(http_server), dest, _md5(data), progress=False)
    assert dest.read_bytes() == data
    assert http_server.requests == [None, "bytes=2000000-"]


# ---------------------------------------------------------------- extract

def _tree(root: Path) -> dict[str, bytes]:
    files = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256)) * 40, "top/sub/deeper/c.txt": b"c"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _make_archive(path: Path, src: Path) -> Path:
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted((src / "top").rglob("*")):
                zf.write(f, f.relative_to(src).as_posix())
    else:
        with tarfile.open(path, "w" if path.suffix == ".tar" else "w:gz") as tar:
            tar.add(src / "top", arcname="top")
    return path


@pytest.mark.parametrize("name", ["a.tar", "a.tgz", "a.tar.gz", "a.zip"])
def test_extract_round_trip(tmp_path, name):
    files = _tree(tmp_path / "src")
    archive = _make_archive(tmp_path / name, tmp_path / "src")
    out = tmp_path / "out" / "dest"
    assert extract(archive, out, progress=False) == out
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("name", ["a.tar", "a.tgz", "a.zip"])
def test_truncated_archive_raises_and_leaves_nothing(tmp_path, name):
    _tree(tmp_path / "src")
    archive = _make_archive(tmp_path / name, tmp_path / "src")
    data = archive.read_bytes()
    # Half-way lies inside the largest member's data (or the zip lacks its directory).
    archive.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "dest"
    with pytest.raises(DatasetError, match=re.escape(str(archive))):
        extract(archive, out, progress=False)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def _member_offsets(archive: Path) -> list[int]:
    with tarfile.open(archive) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("compress", [False, True])
def test_tar_cut_at_a_member_boundary_is_detected(tmp_path, compress):
    """tarfile itself ends silently where a header is missing; extract must not."""
    _tree(tmp_path / "src")
    plain = _make_archive(tmp_path / "a.tar", tmp_path / "src")
    cut = plain.read_bytes()[: _member_offsets(plain)[-1]]  # everything but the last member
    archive = tmp_path / ("cut.tgz" if compress else "cut.tar")
    if compress:
        archive.write_bytes(gzip.compress(cut))
    else:
        archive.write_bytes(cut)
    out = tmp_path / "out" / "dest"
    with pytest.raises(DatasetError, match="no end-of-archive marker"):
        extract(archive, out, progress=False)
    assert not out.exists() and _leftovers(out.parent) == []


def test_tar_with_a_garbled_header_is_detected(tmp_path):
    _tree(tmp_path / "src")
    archive = _make_archive(tmp_path / "a.tar", tmp_path / "src")
    data = bytearray(archive.read_bytes())
    offset = _member_offsets(archive)[3]
    data[offset:offset + 100] = b"\xff" * 100
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="bad checksum"):
        extract(archive, tmp_path / "dest", progress=False)
    assert not (tmp_path / "dest").exists()


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"evil") -> Path:
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("top/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        member.size = 0 if member.issym() else len(data)
        tar.addfile(member, None if member.issym() else io.BytesIO(data))
    return path


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("../evil.txt"),
    tarfile.TarInfo("top/../../evil.txt"),
    tarfile.TarInfo("/tmp/ssr-test-evil.txt"),
    _symlink("top/link", "../../evil.txt"),
    _symlink("top/link", "/etc/passwd"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-dotdot", "symlink-absolute"])
def test_tar_path_traversal_is_refused(tmp_path, member):
    archive = _tar_with(tmp_path / "evil.tar", member)
    out = tmp_path / "x" / "out" / "dest"
    with pytest.raises(DatasetError, match="unsafe member"):
        extract(archive, out, progress=False)
    assert not out.exists() and not (tmp_path / "x" / "evil.txt").exists()
    assert not Path("/tmp/ssr-test-evil.txt").exists()
    assert _leftovers(out.parent) == []


def test_zip_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/ok.txt", "ok")
        zf.writestr("../evil.txt", "evil")
    out = tmp_path / "x" / "out" / "dest"
    with pytest.raises(DatasetError, match="unsafe member '../evil.txt'"):
        extract(archive, out, progress=False)
    assert not out.exists() and not (tmp_path / "x" / "evil.txt").exists()


def test_extract_refuses_existing_dest_and_unknown_format(tmp_path):
    _tree(tmp_path / "src")
    archive = _make_archive(tmp_path / "a.tar", tmp_path / "src")
    (tmp_path / "dest").mkdir()
    with pytest.raises(DatasetError, match="already exists"):
        extract(archive, tmp_path / "dest", progress=False)
    (tmp_path / "a.rar").write_bytes(b"x")
    with pytest.raises(DatasetError, match="unsupported archive format"):
        extract(tmp_path / "a.rar", tmp_path / "dest2", progress=False)


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    previous_umask = os.umask(0o022)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    finally:
        os.umask(previous_umask)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # readable by others, unlike a mkdtemp dir
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- fetch_archive

def test_fetch_archive_uses_local_archive_without_downloading(tmp_path):
    files = _tree(tmp_path / "src")
    archives = tmp_path / "archives"
    archives.mkdir()
    archive = _make_archive(archives / "pack.tgz", tmp_path / "src")
    url = file_url(tmp_path / "nowhere" / "pack.tgz")
    out = fetch_archive(url, md5_of(archive), cache_dir=tmp_path / "cache", archives=archives, progress=False)
    assert out == tmp_path / "cache" / "pack"
    assert (out / "top" / "a.txt").read_bytes() == files["top/a.txt"]
    # A second call reuses the extraction, even with the archive gone.
    archive.unlink()
    assert fetch_archive(url, "0" * 32, cache_dir=tmp_path / "cache", archives=archives, progress=False) == out


def test_fetch_archive_rejects_local_archive_with_bad_checksum(tmp_path):
    _tree(tmp_path / "src")
    archives = tmp_path / "archives"
    archives.mkdir()
    archive = _make_archive(archives / "pack.zip", tmp_path / "src")
    with pytest.raises(DatasetError, match=f"{re.escape(str(archive))}: checksum mismatch"):
        fetch_archive(file_url(archive), "f" * 32, cache_dir=tmp_path / "cache", archives=archives,
                      progress=False)
    assert archive.exists()  # the user's file is never deleted
    assert not (tmp_path / "cache" / "pack").exists()


def test_fetch_archive_downloads_into_cache(tmp_path):
    files = _tree(tmp_path / "src")
    (tmp_path / "server").mkdir()
    archive = _make_archive(tmp_path / "server" / "pack.tar", tmp_path / "src")
    out = fetch_archive(file_url(archive), md5_of(archive), cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "pack.tar").read_bytes() == archive.read_bytes()
    assert (out / "top" / "sub" / "deeper" / "c.txt").read_bytes() == files["top/sub/deeper/c.txt"]
