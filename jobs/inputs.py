"""Turning INPUT arguments (files, directories, @list.txt) into the list of inputs a job works on."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quovadis.jobs.runtime import LOCK_NAME
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.manifest import MANIFEST_NAME

# Extensions of files ffmpeg reads as video, by container (tests/jobs/test_inputs.py writes and
# decodes one of each added for issue 14). Not here: `.yuv` (raw frames need a size ffmpeg cannot
# know), images (`.gif`, `.png`, ...), playlists (`.m3u8`).
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .qt .f4v .3gp .3g2 .mkv .mk3d .webm .avi .divx .mpg .mpeg .m1v .m2v .mpv .vob "
    ".ts .mts .m2ts .flv .wmv .asf .ogv .ogg .ogm .rm .rmvb .nut .dv .mxf .ivf .y4m .mjpeg .mjpg "
    ".h264 .h265 .hevc .264 .265".split()
)
NOT_VIDEO = "not a video extension"
HIDDEN = "hidden (name starts with '.'; give it as an INPUT to take it)"
OUTPUT_DIR = "a quovadis output directory (holds manifest.jsonl or .quovadis.lock), not searched"
LINKED_DIR = "a symbolic link to a directory, not followed (give it as an INPUT to search it)"


@dataclass
class Inputs:
    """The inputs of a job, and every path a directory scan passed over with why (report.json
    `ignored`): a scan drops nothing without a word."""

    paths: list[str] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path": ..., "reason": ...}


def expand_inputs(args: list[str], keep_dir: Callable[[str], bool] | None = None) -> Inputs:
    """Files as given, directories searched recursively for video extensions, `@list.txt` read as
    one input per line (blank lines and `#` comments skipped; its lines are expanded the same way).
    Order is kept, duplicates dropped. A directory for which `keep_dir` is true is an input itself
    (extract's shard directories).

    Paths that do not exist are kept: the job reports each as failed and goes on with the rest.
    A search skips, and lists in `ignored`: files without a video extension; hidden files and
    directories (`.DS_Store`, macOS `._clip.mp4` resource forks, `.git`); quovadis output
    directories (a job's OUT inside the input directory: its shards are not videos); symbolic
    links to directories (os.walk does not follow them: a link loop cannot hang the scan);
    directories it cannot read.
    """
    found = Inputs()
    for arg in args:
        for item in _read_list(Path(arg[1:])) if arg.startswith("@") else [arg]:
            if os.path.isdir(item) and not _looks_like_video(item) and not (keep_dir and keep_dir(item)):
                _scan_dir(Path(item), found)
            else:
                found.paths.append(item)
    found.paths = list(dict.fromkeys(os.path.abspath(p) for p in found.paths))
    unique = {os.path.abspath(i["path"]): i["reason"] for i in found.ignored}
    found.ignored = [{"path": p, "reason": r} for p, r in unique.items()]
    return found


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


def _scan_dir(root: Path, found: Inputs) -> None:
    def unreadable(e: OSError) -> None:
        found.ignored.append({"path": str(e.filename), "reason": f"cannot read directory: {e.strerror or e}"})

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        if _is_output_dir(dirpath):
            found.ignored.append({"path": dirpath, "reason": OUTPUT_DIR})
            dirnames.clear()
            continue
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or os.path.islink(path):
                found.ignored.append({"path": path, "reason": HIDDEN if name.startswith(".") else LINKED_DIR})
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                found.ignored.append({"path": path, "reason": HIDDEN})
            elif not _looks_like_video(name):
                found.ignored.append({"path": path, "reason": NOT_VIDEO})
            else:
                found.paths.append(path)


def _is_output_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST_NAME)) or os.path.exists(os.path.join(path, LOCK_NAME))


def _looks_like_video(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_EXTENSIONS
