"""Files on a local path or on any filesystem Beam knows (gs://, ...), without loading Beam for
a local one: the edges that run in one process (validate on local files) read and write here.

A path with a scheme (`gs://...`) goes through Beam's FileSystems, imported on first use; a
local path through the operating system. Either way a file is read and written as it is
(no compression guessed from its name: the readers decompress, so a truncated archive fails).
"""

from __future__ import annotations

import glob
import os
from typing import BinaryIO


def is_local(path: str) -> bool:
    return "://" not in path


def _beam():
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems, CompressionTypes.UNCOMPRESSED


def open_read(path: str) -> BinaryIO:
    if is_local(path):
        return open(path, "rb")
    filesystems, uncompressed = _beam()
    return filesystems.open(path, compression_type=uncompressed)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """The whole file at `path`, its directory made when missing; a re-run writes it again."""
    if is_local(path):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return
    filesystems, uncompressed = _beam()
    parent, _ = filesystems.split(path)
    if parent and not filesystems.exists(parent):
        filesystems.mkdirs(parent)
    with filesystems.create(path, compression_type=uncompressed) as f:
        f.write(data)


def exists(path: str) -> bool:
    return os.path.exists(path) if is_local(path) else _beam()[0].exists(path)


def join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if is_local(base) else _beam()[0].join(base, *parts)


def match(pattern: str) -> list[tuple[str, int]]:
    """(path, size in bytes) of the files a path or glob names, directories left out, sorted.
    Local globs: `*`, `?` and `[...]` within a path component, `**` across components."""
    if is_local(pattern):
        paths = glob.glob(pattern, recursive=True, include_hidden=True)
        return sorted((p, os.path.getsize(p)) for p in paths if not os.path.isdir(p))
    found = _beam()[0].match([pattern])[0].metadata_list
    return sorted((m.path, m.size_in_bytes) for m in found if not m.path.endswith("/"))
