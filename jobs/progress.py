"""One progress bar per job, as a person watches it: video-seconds done against the total known
from probing, with the rate (video-seconds per wall-second, i.e. times real time) and an ETA.

While the bar is open, log records print above it (tqdm's logging redirect) instead of breaking
it, and so does what other code writes to the terminal's stderr descriptor directly: Ray's C++ core
worker logs there (e.g. its line on actors with restarts, once per actor of a pool), past Python's
logging (`_StderrAboveBar`). The bar is off where stderr is not a terminal (tqdm's disable=None).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_DRAIN_S = 5.0  # at the end, how long the lines still in the pipe may take to print


class Progress(contextlib.AbstractContextManager):
    """Inputs are announced with their expected seconds (`expect`), advanced as parts of them are
    done (`advance`, never past what is expected) and finished with their real seconds (`done`);
    an input that fails counts as done with what was expected of it. `disable`: tqdm's (None: off
    where stderr is not a terminal)."""

    def __init__(self, desc: str, disable: bool | None = None) -> None:
        self.desc = desc
        self.disable = disable
        self.expected: dict[str, float] = {}
        self.advanced: dict[str, float] = {}
        self.failed = 0
        self._bar: tqdm | None = None
        self._redirect: contextlib.AbstractContextManager | None = None
        self._stderr: _StderrAboveBar | None = None

    def __enter__(self) -> Progress:
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
        self._redirect.__enter__()
        self._stderr = _StderrAboveBar() if self.disable is not True and os.isatty(2) else None
        self._bar = tqdm(total=0.0, desc=self.desc, unit="video-s", disable=self.disable, dynamic_ncols=True,
                         file=self._stderr.terminal if self._stderr else sys.stderr,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} video-s "
                                    "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self._stderr is not None:
            self._stderr.stop()  # its last lines print above the bar while the bar is still there to clear
        if self._bar is not None:
            self._bar.close()
        if self._stderr is not None:
            self._stderr.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def expect(self, path: str, seconds: float | None) -> None:
        """`path` will take about `seconds` of video (None: unknown until it is done)."""
        if path in self.expected:
            return
        self.expected[path] = float(seconds or 0.0)
        if self._bar is not None:
            self._bar.total += self.expected[path]
            self._bar.refresh()

    def advance(self, path: str, seconds: float) -> None:
        """`seconds` more of `path` are done (ignored until it is expected)."""
        if path not in self.expected:
            return
        before = self.advanced.get(path, 0.0)
        self.advanced[path] = min(self.expected[path], before + seconds)
        if self._bar is not None:
            self._bar.update(self.advanced[path] - before)

    def done(self, path: str, seconds: float | None = None, *, failed: bool = False) -> None:
        """`path` is finished: `seconds` of video (None: as expected)."""
        expected = self.expected.pop(path, 0.0)
        advanced = self.advanced.pop(path, 0.0)
        real = expected if seconds is None else float(seconds)
        self.failed += failed
        if self._bar is not None:
            self._bar.total += real - expected
            if failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            self._bar.update(real - advanced)


class _StderrAboveBar:
    """While open, descriptor 2 is a pipe whose lines a thread prints above the bar, whole (tqdm.write);
    the bar draws on `terminal`, a copy of the original descriptor. Python's own stderr writes (the
    log records, warnings) take the same way. `stop` puts descriptor 2 back and prints what is left,
    before the bar closes: a line printed after the bar has left tqdm's list would land on the bar's
    own line (seen: "... failed=1]2026-12-03 07:53:25,111 INFO ... wrote shard-00000.h5")."""

    def __init__(self) -> None:
        self.terminal = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
        read, write = os.pipe()
        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        self._lines = os.fdopen(read, "r", errors="replace")
        self._thread = threading.Thread(target=self._print, name="stderr-above-bar", daemon=True)
        self._thread.start()

    def _print(self) -> None:
        for line in self._lines:
            tqdm.write(line.rstrip("\n"), file=self.terminal)

    def stop(self) -> None:
        """Descriptor 2 back to the terminal, and what the pipe still holds printed."""
        sys.stderr.flush()
        os.dup2(self.terminal.fileno(), 2)  # closes the pipe's writing end: the thread reads to its end
        self._thread.join(_DRAIN_S)

    def close(self) -> None:
        if not self._thread.is_alive():  # else a child process still holds the pipe: both stay open for the thread
            self._lines.close()
            self.terminal.close()
