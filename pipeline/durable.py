"""Durable file writes: after a crash (of the process or of the machine) a path holds its old
content or its new content, never a torn file.

The one recipe, used for every file quovadis writes whole (shards, feature files, npy features and
their meta, report.json, settings.json, metrics.jsonl, labels.txt, curves.png, checkpoints):

    write PATH.tmp in the same directory -> fsync it -> os.replace(PATH.tmp, PATH) -> fsync the directory

The fsync of the file puts its data on disk before the rename can; the fsync of the directory puts
the rename itself on disk. On any exception the temporary file is removed and PATH is untouched.
The temporary name is fixed (`PATH.tmp`), so a leftover of a killed process is recognisable and is
overwritten by the next write; a directory is written by one job at a time (jobs.runtime.out_dir_lock).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

TMP_SUFFIX = ".tmp"


def tmp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name a write of `path` goes through."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so the renames and creations inside it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give the complete, closed file `tmp` its final name `path`: fsync, rename, fsync the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """`with atomic_path(p) as tmp:` write and close `tmp` by name (h5py, ...); on leaving the block
    it is committed as `p`, or removed when the block raised."""
    tmp = tmp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write `path` durably: `write(f)` fills a binary file object. Raises OSError (the caller
    names its own error)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` durably."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int = 1, sort_keys: bool = False) -> Path:
    """Write `data` as JSON (values JSON cannot hold as str) and a newline to `path` durably."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")
