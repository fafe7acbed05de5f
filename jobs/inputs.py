"""Turning INPUT arguments (files, directories, @list.txt) into the list of inputs a job works on."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from quovadis.pipeline.errors import ConfigError

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .flv .wmv .3gp .ogv .h264 .h265 .hevc .264 .265 .y4m .mxf .vob .asf".split()
)


def expand_inputs(args: list[str], keep_dir: Callable[[str], bool] | None = None) -> list[str]:
    """Files as given, directories searched recursively for video extensions, `@list.txt` read as
    one input per line (blank lines and `#` comments skipped; its lines are expanded the same way).
    Order is kept, duplicates dropped. A directory for which `keep_dir` is true is an input itself
    (extract's shard directories).

    Paths that do not exist are kept: the job reports each as failed and goes on with the rest.
    """
    found: list[str] = []
    for arg in args:
        for item in _read_list(Path(arg[1:])) if arg.startswith("@") else [arg]:
            if os.path.isdir(item) and not _looks_like_video(item) and not (keep_dir and keep_dir(item)):
                found += _scan_dir(Path(item))
            else:
                found.append(item)
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read input list {path}: {e.strerror or e}") from e
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line if os.path.isabs(line) else str(path.parent / line))
    return entries


def _scan_dir(root: Path) -> list[str]:
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        hits += [os.path.join(dirpath, f) for f in sorted(filenames) if _looks_like_video(f)]
    return hits


def _looks_like_video(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_EXTENSIONS
