"""labels.csv: which stored video has which class (and which split), for `train` and `evaluate`.

Format (UTF-8 CSV, one video per row; a header row `video,label[,split]` is optional)::

    video,label,split
    clips/walk_01.mp4,walk,train
    run_07-3f2a9c0e1d2b4a5f,run,val      # a shard key also works

`video` names a video of the shard directory by its source path (absolute, or relative to the
CSV's folder or to the working directory), by its shard key, or by its file name / stem when
that is unique among the stored videos. `split` is free text (train, val, test, ...). Every row
must match a stored `ok` video: rows that match nothing, or more than one video, raise one
ConfigError listing them all, so a typo never silently shrinks a dataset.

Class indices follow the sorted label names (numerically when every label is an integer), unless
a checkpoint fixes them (`classes=`), so the same CSV always gives the same indices.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quovadis.pipeline.errors import ConfigError, ShardError
from quovadis.pipeline.manifest import LedgerEntry, load as manifest_load

log = logging.getLogger(__name__)

HEADER = ("video", "label", "split")
_LISTED = 10  # unmatched names shown in an error before "... and N more"


@dataclass(frozen=True)
class LabelledVideo:
    """One stored video with its class: `input` is the manifest's source path, `key` its group."""

    input: str
    key: str
    shard: str
    frames: int
    label: int
    split: str | None


@dataclass(frozen=True)
class LabelSet:
    """The videos of a labels.csv matched to a shard directory, with the class names by index."""

    classes: tuple[str, ...]
    videos: tuple[LabelledVideo, ...]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(sorted({v.split for v in self.videos if v.split is not None}))

    def split(self, name: str | None) -> list[LabelledVideo]:
        """The videos of split `name`; None gives every video."""
        if name is None:
            return list(self.videos)
        return [v for v in self.videos if v.split == name]


def _sort_labels(names: set[str]) -> tuple[str, ...]:
    if names and all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def read_rows(csv_path: Path) -> list[tuple[str, str, str | None, int]]:
    """(video, label, split or None, line number) per data row of a labels.csv."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ConfigError(f"cannot read labels file {csv_path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"labels file {csv_path} is not UTF-8 text: {e}") from e
    out: list[tuple[str, str, str | None, int]] = []
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if not out and tuple(c.lower() for c in cells) in (HEADER[:2], HEADER):
            continue  # the optional header row
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise ConfigError(f"{csv_path} line {number}: expected 'video,label[,split]', got {row!r}")
        out.append((cells[0], cells[1], (cells[2] or None) if len(cells) == 3 else None, number))
    if not out:
        raise ConfigError(f"labels file {csv_path} has no rows (expected 'video,label[,split]')")
    return out


class _Index:
    """Lookup of stored videos by path, key, file name and stem."""

    def __init__(self, entries: Sequence[LedgerEntry]):
        self.by_input = {e.input: e for e in entries}
        self.by_key = {e.key: e for e in entries}
        self.by_name: dict[str, list[LedgerEntry]] = defaultdict(list)
        for e in entries:
            base = os.path.basename(e.input)
            self.by_name[base].append(e)
            stem = os.path.splitext(base)[0]
            if stem != base:
                self.by_name[stem].append(e)

    def find(self, name: str, bases: Sequence[Path]) -> tuple[LedgerEntry | None, str | None]:
        """(entry, None) when `name` names one video, else (None, why)."""
        if name in self.by_input:
            return self.by_input[name], None
        for base in bases:
            candidate = os.path.abspath(os.path.join(base, os.path.expanduser(name)))
            if candidate in self.by_input:
                return self.by_input[candidate], None
        if name in self.by_key:
            return self.by_key[name], None
        matches = self.by_name.get(name, [])
        if len(matches) == 1:
            return matches[0], None
        if len(matches) > 1:
            return None, f"{name!r} is ambiguous ({len(matches)} stored videos have that name; give a path or key)"
        return None, f"{name!r}"


def _names(path: str, bases: Sequence[Path]) -> set[str]:
    """The names a labels.csv row may use for `path` (used to explain why a row did not match)."""
    base = os.path.basename(path)
    names = {path, base, os.path.splitext(base)[0]}
    names |= {os.path.relpath(path, b) for b in bases}
    return names


def load_labels(
    csv_path: str | os.PathLike[str],
    shard_dir: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
) -> LabelSet:
    """Match labels.csv to the `ok` videos of `shard_dir` (see the module docstring).

    `classes` fixes the class order (a checkpoint's); a label outside it is a ConfigError.
    """
    csv_path, shard_dir = Path(csv_path), Path(shard_dir)
    try:
        entries = manifest_load(shard_dir)
    except ShardError as e:
        raise ConfigError(str(e)) from e
    if not entries:
        raise ConfigError(f"{shard_dir} has no manifest.jsonl entries: is it a `quovadis preprocess` output?")
    ok = [e for e in entries.values() if e.status == "ok"]
    failed = {e.input: e.reason for e in entries.values() if e.status == "failed"}
    index = _Index(ok)
    bases = [csv_path.resolve().parent, Path.cwd()]

    rows = read_rows(csv_path)
    unmatched: list[str] = []
    seen: dict[str, int] = {}
    matched: list[tuple[LedgerEntry, str, str | None]] = []
    for video, label, split, number in rows:
        entry, why = index.find(video, bases)
        if entry is None:
            failed_reason = next((reason for path, reason in failed.items() if video in _names(path, bases)), None)
            if failed_reason:
                why = f"{why} (preprocess failed: {failed_reason})"
            unmatched.append(f"line {number}: {why}")
            continue
        if entry.input in seen:
            raise ConfigError(
                f"{csv_path} line {number}: video {video!r} is already labelled on line {seen[entry.input]}"
            )
        seen[entry.input] = number
        matched.append((entry, label, split))
    if unmatched:
        shown = "; ".join(unmatched[:_LISTED])
        more = f"; ... and {len(unmatched) - _LISTED} more" if len(unmatched) > _LISTED else ""
        raise ConfigError(
            f"{csv_path}: {len(unmatched)} of {len(rows)} labelled videos match no stored video in "
            f"{shard_dir} (by source path, key, or unique file name): {shown}{more}"
        )

    names = {label for _, label, _ in matched}
    if classes is None:
        class_names = _sort_labels(names)
    else:
        class_names = tuple(classes)
        unknown = sorted(names - set(class_names))
        if unknown:
            raise ConfigError(
                f"{csv_path}: labels {unknown} are not classes of the model ({len(class_names)} classes: "
                f"{', '.join(class_names[:_LISTED])}{', ...' if len(class_names) > _LISTED else ''})"
            )
    class_index = {name: i for i, name in enumerate(class_names)}
    videos = tuple(
        LabelledVideo(
            input=e.input, key=e.key, shard=e.file, frames=int(e.frames), label=class_index[label], split=split
        )
        for e, label, split in matched
    )
    log.info("%s: %d labelled videos, %d classes, splits %s", csv_path, len(videos), len(class_names),
             sorted({v.split for v in videos if v.split}) or "none")  # fmt: skip
    return LabelSet(classes=class_names, videos=videos)
