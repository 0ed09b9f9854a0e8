"""Fetching, verifying and unpacking dataset archives.

`download` is resumable: bytes go to `{dest}.part` and a later call continues
where it stopped (HTTP Range request; for file:// URLs the source is opened
at the same offset, so both take one code path). The final name appears only
after the MD5 checksum matched. `extract` and `atomic_dir` build a directory
under a temporary name beside its target and rename it at the end, so a
failure never leaves a half-filled directory under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from ssr.data.layout import DatasetError
from ssr.progress import progress_bar

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
ZIP_SUFFIXES = (".zip",)


def md5_file(path: str | os.PathLike, chunk_size: int = CHUNK_SIZE, algorithm: str = "md5") -> str:
    """The file's hex digest (md5, or another hashlib `algorithm`), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: str | os.PathLike, md5: str) -> None:
    """Raise DatasetError naming `path` unless its MD5 is `md5`."""
    logger.info("%s: verifying the checksum", path)
    actual = md5_file(path)
    if actual != md5.lower():
        raise DatasetError(f"{path}: checksum mismatch (expected md5 {md5.lower()}, got {actual})")


def _check_md5_format(md5: str) -> None:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}")


def archive_name(url: str) -> str:
    """The file name an archive URL points to (its last path component)."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name:
        raise DatasetError(f"{url}: URL has no file name")
    return name


def _open_at(url: str, offset: int, timeout: float) -> tuple[BinaryIO, int, int | None]:
    """Open `url` for reading from byte `offset`.

    Returns (stream, start, total): `start` is where the stream really begins
    (0 when an HTTP server ignores the Range header), `total` the full size
    when known.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        source = open(urllib.request.url2pathname(parts.path), "rb")
        total = os.fstat(source.fileno()).st_size
        start = min(offset, total)
        source.seek(start)
        return source, start, total
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # The partial file already holds every byte; the checksum decides.
            err.close()
            return io.BytesIO(), offset, offset
        raise
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            response.close()
            raise DatasetError(f"{url}: server answered the range request with a bad Content-Range "
                               f"{response.headers.get('Content-Range')!r}")
        return response, offset, None if match.group(2) == "*" else int(match.group(2))
    length = response.headers.get("Content-Length")
    return response, 0, int(length) if length is not None else None


def download(url: str, dest: Path, md5: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` and verify its MD5; return `dest`.

    An existing `dest` with the right checksum is kept as is. Bytes land in
    `{dest}.part`; an interrupted call leaves it there and the next call
    resumes from its end. On a checksum mismatch the .part file is deleted
    (a resume cannot repair it) and DatasetError names the file and both sums.
    """
    dest = Path(dest)
    md5 = md5.lower()
    _check_md5_format(md5)
    if dest.is_file():
        if md5_file(dest) == md5:
            logger.info("%s: already downloaded, checksum ok", dest)
            return dest
        logger.warning("%s: checksum does not match %s; downloading it again", dest, md5)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    try:
        stream, start, total = _open_at(url, offset, timeout)
    except (OSError, HTTPException, ValueError) as err:
        raise DatasetError(f"{url}: cannot open ({err})") from err
    if offset and start == offset:
        logger.info("%s: resuming at byte %d", part, start)
    elif offset:
        logger.info("%s: server does not support resuming; starting again from byte 0", part)
    written = start
    try:
        with stream, open(part, "r+b" if part.exists() else "wb") as out, progress_bar(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=dest.name, progress=progress,
        ) as bar:
            out.seek(start)
            out.truncate()
            while chunk := stream.read(CHUNK_SIZE):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    except (OSError, HTTPException) as err:
        raise DatasetError(f"{url}: download interrupted at byte {written} ({err}); "
                           f"the partial file {part} is kept, run again to resume") from err
    if total is not None and written != total:
        raise DatasetError(f"{url}: download stopped at byte {written} of {total}; "
                           f"the partial file {part} is kept, run again to resume")
    actual = md5_file(part)
    if actual != md5:
        part.unlink()
        raise DatasetError(f"{dest.name}: checksum mismatch (expected md5 {md5}, got {actual}) "
                           f"for the download from {url}; the corrupt file was deleted")
    os.replace(part, dest)
    return dest


def _sibling_dir(path: Path, suffix: str) -> Path:
    """Create a new hidden directory beside `path`; unlike mkdtemp its mode follows the umask,
    so the renamed result is as readable as any directory the user creates."""
    while True:
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; it becomes `path` only on success.

    An existing `path` is replaced (moved aside, then deleted) after the new
    one is complete; on failure the temporary directory is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_dir(path, ".tmp")
    try:
        yield tmp
        if path.exists():
            old = _sibling_dir(path, ".old")
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def archive_stem(archive: str | os.PathLike) -> str:
    """`benchmark.tgz` -> `benchmark`; raises DatasetError for unsupported formats."""
    name = Path(archive).name
    for suffix in TAR_SUFFIXES + ZIP_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise DatasetError(f"{archive}: unsupported archive format (expected {', '.join(TAR_SUFFIXES + ZIP_SUFFIXES)})")


def _check_member(archive: Path, name: str) -> None:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or ".." in member.parts or re.match(r"^[A-Za-z]:", name):
        raise DatasetError(f"{archive}: unsafe member {name!r} (absolute path or '..'); refusing to extract")


class _ProgressReader:
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, f: BinaryIO, bar: tqdm):
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


class _CheckedTarInfo(tarfile.TarInfo):
    """Records why reading members stopped on the TarFile.

    tarfile ends the member list silently at a missing, cut or garbled header,
    which would pass a truncated archive as complete; only a zero block is a
    real end-of-archive marker.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.ssr_stop = err
            raise


def _extract_tar(archive: Path, out: Path, progress: bool) -> None:
    def members(tar: tarfile.TarFile):
        for member in tar:
            _check_member(archive, member.name)
            if member.issym() or member.islnk():
                _check_member(archive, member.linkname)
            yield member

    with open(archive, "rb") as f, progress_bar(total=archive.stat().st_size, unit="B", unit_scale=True,
                                                unit_divisor=1024, desc=f"extract {archive.name}",
                                                progress=progress) as bar:
        # Stream mode reads a compressed archive once instead of indexing it first.
        with tarfile.open(fileobj=_ProgressReader(f, bar), mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            tar.extractall(out, members=members(tar), filter="data")
            stop = getattr(tar, "ssr_stop", None)
            if not isinstance(stop, tarfile.EOFHeaderError):
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset} of the tar stream "
                                        f"({stop or 'end of data'})")


def _extract_zip(archive: Path, out: Path, progress: bool) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(archive, info.filename)
        with progress_bar(total=sum(i.compress_size for i in infos), unit="B", unit_scale=True, unit_divisor=1024,
                          desc=f"extract {archive.name}", progress=progress) as bar:
            for info in infos:
                zf.extract(info, out)
                bar.update(info.compress_size)


def extract(archive: str | os.PathLike, dest_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Unpack a .tar/.tgz/.tar.gz/.zip archive so that its members lie under `dest_dir`.

    The archive is unpacked into a temporary directory beside `dest_dir` that
    is renamed at the end; a truncated or corrupt archive, or a member whose
    path would escape `dest_dir`, raises DatasetError naming the archive and
    leaves nothing at `dest_dir`. `dest_dir` must not exist yet.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    archive_stem(archive)
    if not archive.is_file():
        raise DatasetError(f"{archive}: archive not found")
    if dest_dir.exists():
        raise DatasetError(f"{dest_dir}: already exists; remove it to extract {archive.name} again")
    try:
        with atomic_dir(dest_dir) as tmp:
            if archive.name.endswith(ZIP_SUFFIXES):
                _extract_zip(archive, tmp, progress)
            else:
                _extract_tar(archive, tmp, progress)
    except tarfile.FilterError as err:
        raise DatasetError(f"{archive}: unsafe member ({err}); refusing to extract") from err
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        raise DatasetError(f"{archive}: cannot extract; the archive is truncated or corrupt, "
                           f"or the disk is full ({type(err).__name__}: {err})") from err
    return dest_dir


def fetch_archive(url: str, md5: str, *, cache_dir: Path, archives: Path | None = None,
                  progress: bool = True) -> Path:
    """Return a directory holding the contents of the archive at `url`.

    In order: an earlier extraction in `cache_dir/{stem}` is reused; an
    archive of the same file name in `archives` is checksummed and extracted
    (never downloaded); otherwise the archive is downloaded into `cache_dir`,
    resumably, then extracted.
    """
    name = archive_name(url)
    extracted = Path(cache_dir) / archive_stem(name)
    if extracted.is_dir():
        logger.info("%s: reusing the earlier extraction", extracted)
        return extracted
    local = Path(archives) / name if archives is not None else None
    if local is not None and local.is_file():
        _check_md5_format(md5)
        check_md5(local, md5)
        archive = local
    else:
        archive = download(url, Path(cache_dir) / name, md5, progress=progress)
    return extract(archive, extracted, progress=progress)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (no extra disk), copying where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
