"""The ledgers: what happened to every input of a directory, append-only. One entry type,
`LedgerEntry`, and one set of rules for both ledgers: a shard directory's manifest.jsonl (here) and
a feature directory's index.jsonl (pipeline/features.py).

On disk (readable with `json` alone)::

    OUT/manifest.jsonl     one JSON object per line, UTF-8, appended and fsync'd per batch of events:
      {"input": "/abs/path/video.mp4",   # the input as the job saw it (absolute path)
       "status": "ok" | "failed",
       "file": "shard-00000.h5" | null,  # file name inside OUT (ok only; "shard" in older manifests)
       "key": "video-3f2a...e1" | null,  # HDF5 group of the video in that shard (ok only)
       "frames": 133 | null,             # frames stored (ok only)
       "clips": null,                    # clips of its features (index.jsonl only)
       "reason": null | "one line",      # why it failed (failed only)
       "warnings": ["one line", ...],    # ffmpeg errors of a decode that kept its frames (ok only)
       "info": {...}}                    # free metadata: probe results, height, width, fps, streams

Rules: the LAST line for an input wins (a retried failure is followed by its `ok`); a line that
does not parse is skipped with a warning, which covers a torn last line from a crash mid-write.
An `ok` line is written only after its file was committed under its final name (pipeline.durable),
so every `ok` entry points at a complete file; a final-named file no `ok` line names is adopted at
the next start (`adopt_unlisted`). Paths that are not valid UTF-8 round-trip through JSON's
`\\udcXX` escapes (Python's surrogateescape).

Reading a video without quovadis::

    import h5py, json
    entries = {}
    for line in open("OUT/manifest.jsonl", encoding="utf-8"):
        try: e = json.loads(line)
        except ValueError: continue
        entries[e["input"]] = e
    e = entries["/abs/path/video.mp4"]
    with h5py.File(f"OUT/{e.get('file') or e['shard']}", "r") as f:
        rgb = f[e["key"]]["rgb"][0:64]    # uint8 (64, H, W, 3)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from quovadis.pipeline.errors import ShardError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"

Status = Literal["ok", "failed"]


@dataclass(frozen=True)
class LedgerEntry:
    """One event for one input: done (`ok`: its `file` in OUT, `key` there (HDF5 group, or npy
    prefix), `frames`, and `clips` for features) or `failed` (with a one-line reason)."""

    input: str
    status: Status
    file: str | None = None
    key: str | None = None
    frames: int | None = None
    clips: int | None = None
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # done, but ffmpeg reported errors of its decode

    def __post_init__(self) -> None:
        if self.status == "ok":
            if not self.file or not self.key or self.frames is None:
                raise ShardError(f"ledger entry for {self.input!r}: ok needs file, key and frames")
        elif self.status == "failed":
            if not self.reason:
                raise ShardError(f"ledger entry for {self.input!r}: failed needs a reason")
        else:
            raise ShardError(f"ledger entry for {self.input!r}: unknown status {self.status!r}")

    @classmethod
    def failed(cls, input: str, reason: str, info: dict[str, Any] | None = None) -> LedgerEntry:
        """A failure with a one-line reason (newlines are folded so the line stays one line)."""
        one_line = " ".join(str(reason).split()) or "unknown error"
        return cls(input=input, status="failed", reason=one_line, info=dict(info or {}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        """An entry of a line; lines of older versions load too (manifests named the file "shard",
        and had no clips or warnings)."""
        return cls(
            input=data["input"],
            status=data["status"],
            file=data.get("file", data.get("shard")),
            key=data.get("key"),
            frames=data.get("frames"),
            clips=data.get("clips"),
            reason=data.get("reason"),
            info=dict(data.get("info") or {}),
            warnings=list(data.get("warnings") or []),
        )


def manifest_path(out_dir: Path) -> Path:
    return Path(out_dir) / MANIFEST_NAME


def append(out_dir: Path, entries: Iterable[LedgerEntry]) -> None:
    """Append entries as lines and fsync, so an entry that returned is on disk."""
    append_lines(manifest_path(out_dir), [e.to_json() for e in entries])


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ASCII JSON lines to `path` and fsync (the manifest and extract's feature index).

    A torn line left by an earlier crash is closed with a newline first, so it cannot swallow
    the first new line.
    """
    if not lines:
        return
    data = "".join(line + "\n" for line in lines)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = "\n" + data
            raw = data.encode("ascii")  # ensure_ascii: every line is plain ASCII
            written = 0
            while written < len(raw):
                written += os.write(fd, raw[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ShardError(f"cannot append to {path}: {e}") from e


def load(out_dir: Path) -> dict[str, LedgerEntry]:
    """The latest entry per input; unparsable lines (a torn tail) are skipped with a warning.

    A directory without a manifest has no entries.
    """
    return load_lines(manifest_path(out_dir))


def load_lines(path: Path) -> dict[str, LedgerEntry]:
    """{input: latest entry} of a ledger written by `append_lines` (the manifest and extract's
    feature index); a line that does not parse (a torn tail) is skipped with a warning."""
    entries: dict[str, LedgerEntry] = {}
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return entries
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = LedgerEntry.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError, ShardError) as e:
            log.warning("%s line %d is not an entry (torn write?), skipped: %s", path, number, e)
            continue
        entries[entry.input] = entry
    return entries


def adopt_unlisted(
    ledger: Path, files: Mapping[str, Path], entries_of: Callable[[Path], list[LedgerEntry]]
) -> list[LedgerEntry]:
    """The crash-recovery rule of both ledgers: a committed file (`files`: its `file` name in the
    ledger -> the path that describes it) that no `ok` line of `ledger` names is adopted:
    `entries_of(path)` reads its entries back from the file, and they are appended.

    A writer killed between committing a file and appending its lines leaves such a file. Adopting
    is safe because a file gets its final name only from pipeline.durable.commit, after it was
    completely written and fsync'd, and because shards and feature files describe themselves
    (format attribute; per video its source path, frames, fps, ...), so `entries_of` rebuilds
    exactly the lines the writer was about to append, and raises for a file that does not read as
    its format. Deleting it instead would redo its work (decode and flow of up to a GiB per shard)
    and, should the ledger be lost, delete every result of the directory.
    """
    listed = {e.file for e in load_lines(ledger).values() if e.status == "ok"}
    entries: list[LedgerEntry] = []
    for name, path in files.items():
        if name not in listed:
            found = entries_of(path)
            log.warning("%s was complete but not in %s (interrupted run): recorded its %d videos", path, ledger.name, len(found))
            entries += found
    append_lines(ledger, [e.to_json() for e in entries])
    return entries


def done_inputs(out_dir: Path) -> set[str]:
    """Inputs whose latest entry is `ok` (a re-run skips them)."""
    return {k for k, e in load(out_dir).items() if e.status == "ok"}


def failed_inputs(out_dir: Path) -> dict[str, str]:
    """Inputs whose latest entry is `failed`, with their reasons (retried with --retry-failed)."""
    return {k: e.reason or "" for k, e in load(out_dir).items() if e.status == "failed"}
