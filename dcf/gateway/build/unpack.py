"""An uploaded code archive, unpacked only once its headers show it fits the limits.

A 2 MB tar.gz can hold 2 GiB of zeros, or a million empty members: so before
anything is written the headers are read (the data between them is skipped,
never held), counting members and the bytes they declare; only an archive
within ``Limits`` is then extracted, with tarfile's ``data`` filter (no
absolute paths, no ``..``, no links out of the directory, no devices). The
bytes a header may take are bounded too (a pax or long-name header is read
whole by tarfile). Runs in a worker thread: it is CPU and disk work.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from dcf.gateway.limits import Limits

MAX_HEADER = 1 << 20
"""Bytes one header (with its pax or GNU long-name records) may take."""


class ArchiveRefused(Exception):
    """The upload cannot be unpacked: ``status`` (400 or 413) and a message naming why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def unpack(archive: bytes, target: Path, handler_file: str, limits: Limits) -> None:
    """Extract ``archive`` into ``target`` (created), or raise ArchiveRefused naming why.

    ``target`` is left absent when refused.
    """
    if len(archive) > limits.max_upload:
        raise ArchiveRefused(
            413,
            f"code archive is {len(archive)} bytes, over the gateway's archive limit of"
            f" {limits.max_upload} bytes (--max-upload)",
        )
    try:
        _scan(archive, limits)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            tar.extractall(target, filter=_Within(limits))
    except ArchiveRefused:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except tarfile.FilterError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveRefused(400, f"code archive has an unsafe member: {exc}") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveRefused(400, f"code archive is not a valid tar.gz: {exc}") from None
    handler = (target / handler_file).resolve()
    if not handler.is_relative_to(target.resolve()) or not handler.is_file():
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveRefused(
            400, f"field 'handler.file': {handler_file!r} is not a file in the upload"
        )


def _decompressed(archive: bytes) -> BinaryIO:
    raw = io.BytesIO(archive)
    if archive[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if archive[:3] == b"BZh":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if archive[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return raw


class _HeadersOnly(io.RawIOBase):
    """The decompressed archive as tarfile reads it to list members: headers are read,
    file data is skipped by seeking. Refuses a header over ``MAX_HEADER`` bytes and more
    header bytes in all than ``budget``, before tarfile holds them."""

    def __init__(self, stream: BinaryIO, budget: int) -> None:
        self._stream = stream
        self._budget = budget

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_HEADER:
            raise ArchiveRefused(413, f"code archive has a header of more than {MAX_HEADER} bytes")
        self._budget -= size
        if self._budget < 0:
            raise ArchiveRefused(413, "code archive's headers take too many bytes")
        return self._stream.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


def _scan(archive: bytes, limits: Limits) -> None:
    """Count members and declared bytes from the headers alone; refuse past a limit."""
    budget = (limits.max_upload_files + 2) * 2048 + MAX_HEADER
    stream = _HeadersOnly(_decompressed(archive), budget)
    files = 0
    size = 0
    with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[arg-type]
        # A member is checked before tarfile seeks past its data to the next header,
        # so no declared size over the limit is ever decompressed.
        for member in tar:
            files += 1
            size += member.size
            if files > limits.max_upload_files:
                raise ArchiveRefused(
                    413,
                    f"code archive has more than the gateway's limit of"
                    f" {limits.max_upload_files} files (--max-upload-files)",
                )
            if size > limits.max_unpacked:
                raise ArchiveRefused(
                    413,
                    f"code archive's unpacked size is over the gateway's limit of"
                    f" {limits.max_unpacked} bytes (--max-unpacked)",
                )
            if member.issparse():
                raise ArchiveRefused(400, f"code archive member {member.name!r} is a sparse file")


class _Within:
    """tarfile's ``data`` filter, counting again while extracting (what is written is what
    the headers declared, so this only guards against a scan that missed something)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._files = 0
        self._size = 0

    def __call__(self, member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        self._files += 1
        self._size += member.size
        if self._files > self._limits.max_upload_files or self._size > self._limits.max_unpacked:
            raise ArchiveRefused(413, "code archive is over the gateway's unpacked limits")
        if member.issparse():
            raise ArchiveRefused(400, f"code archive member {member.name!r} is a sparse file")
        return tarfile.data_filter(member, path)
