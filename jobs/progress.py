"""One progress bar per job, as a person watches it: video-seconds done against the total known
from probing, with the rate (video-seconds per wall-second, i.e. times real time) and an ETA.
The totals can come from a thread (`expect_from`: `probed_durations`, the driver's own probes
beside the job's graph), and the bar is redrawn every second, so its clock moves while the first
parts are still on their way.

While the bar is open, log records print above it (tqdm's logging redirect) instead of breaking
it, and so does what other code writes to the terminal's stderr descriptor directly: Ray's C++ core
worker logs there (e.g. its line on actors with restarts, once per actor of a pool), past Python's
logging (`_StderrAboveBar`). The bar is off where stderr is not a terminal (tqdm's disable=None).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from quovadis.pipeline.errors import QuovadisError
from quovadis.pipeline.probe import probe

_DRAIN_S = 5.0  # at the end, how long the lines still in the pipe may take to print
_TICK_S = 1.0  # the bar is redrawn at least this often, so its clock moves while no part is done
_EXPECT_JOIN_S = 1.0  # at the end, how long the thread of `expect_from` may take to see it is over
_PROBE_THREADS = 4  # probed_durations' ffmpeg probes at once

log = logging.getLogger(__name__)


class Progress(contextlib.AbstractContextManager):
    """Inputs are announced with their expected seconds (`expect`), advanced as parts of them are
    done (`advance`, never past what is expected) and finished with their real seconds (`done`);
    an input that fails counts as done with what was expected of it. `disable`: tqdm's (None: off
    where stderr is not a terminal). Thread-safe: `expect_from` calls `expect` from its thread."""

    def __init__(self, desc: str, disable: bool | None = None) -> None:
        self.desc = desc
        self.disable = disable
        self.expected: dict[str, float] = {}
        self.advanced: dict[str, float] = {}
        self.finished: set[str] = set()
        self.failed = 0
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._expecting: list[threading.Thread] = []
        self._ticking: threading.Thread | None = None
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
        if not self._bar.disable:
            self._ticking = threading.Thread(target=self._tick, name="progress-tick", daemon=True)
            self._ticking.start()
        return self

    def _tick(self) -> None:
        """Redraw the bar every _TICK_S: a job's first parts can take minutes (model starts,
        torch.compile, a batch of I3D), and a bar whose clock stands still looks hung."""
        while not self._closing.wait(_TICK_S):
            with self._lock:
                self._bar.refresh()

    def __exit__(self, *exc) -> None:
        self._closing.set()
        for thread in self._expecting:
            thread.join(_EXPECT_JOIN_S)  # else it ends at its next row, as a daemon
        if self._ticking is not None:
            self._ticking.join()
        if self._stderr is not None:
            self._stderr.stop()  # its last lines print above the bar while the bar is still there to clear
        if self._bar is not None:
            self._bar.close()
        if self._stderr is not None:
            self._stderr.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def expect(self, path: str, seconds: float | None) -> None:
        """`path` will take about `seconds` of video (None: unknown until it is done); ignored
        once it is expected or done."""
        with self._lock:
            if path in self.expected or path in self.finished:
                return
            self.expected[path] = float(seconds or 0.0)
            if self._bar is not None:
                self._bar.total += self.expected[path]
                self._bar.refresh()

    def expect_from(self, expected: Iterable[tuple[str, float | None]]) -> None:
        """`expect` each (path, seconds) of `expected`, in a thread, while the job goes on: e.g.
        `probed_durations`, which yields them as they are probed. An error there only
        leaves the totals to the job's own `expect` calls (logged)."""

        def run() -> None:
            try:
                for path, seconds in expected:
                    if self._closing.is_set():
                        break
                    self.expect(path, seconds)
            except Exception as e:  # e.g. the cluster went away: the job itself says so
                log.warning("progress: the probed totals stopped coming (%s); totals now come as videos end", e)
            finally:
                close = getattr(expected, "close", None)
                if close is not None:
                    close()

        thread = threading.Thread(target=run, name="progress-expect", daemon=True)
        self._expecting.append(thread)
        thread.start()

    def advance(self, path: str, seconds: float) -> None:
        """`seconds` more of `path` are done (ignored until it is expected)."""
        with self._lock:
            if path not in self.expected:
                return
            before = self.advanced.get(path, 0.0)
            self.advanced[path] = min(self.expected[path], before + seconds)
            if self._bar is not None:
                self._bar.update(self.advanced[path] - before)

    def done(self, path: str, seconds: float | None = None, *, failed: bool = False) -> None:
        """`path` is finished: `seconds` of video (None: as expected)."""
        with self._lock:
            self.finished.add(path)
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


def probed_durations(paths: list[str], threads: int = _PROBE_THREADS) -> Iterator[tuple[str, float]]:
    """(path, probed seconds) of each of `paths` as ffmpeg probes it, `threads` probes at a time in
    daemon threads of this process: the bar's total, known before the job's graph sends its first
    row (rows reach the driver only through its last stage's batches: a one-video extract showed no
    total for 53 s). Probed here, not in Ray tasks: on a 2-core machine the four worker processes
    those took cost 1-2 CPU s each at the job's start. A path that fails to probe yields nothing
    (the job fails that video itself, with its reason). Closing the iterator stops the probing
    once the probes under way end."""
    workers = min(threads, len(paths))
    todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # the paths, then a None per thread
    for path in [*paths, *[None] * workers]:
        todo.put(path)
    found: queue.SimpleQueue[tuple[str, float] | Exception | None] = queue.SimpleQueue()  # None: a thread ended
    stop = threading.Event()

    def probe_next() -> None:
        try:
            while not stop.is_set() and (path := todo.get()) is not None:
                with contextlib.suppress(QuovadisError):
                    found.put((path, probe(path).duration or 0.0))
        except Exception as e:  # handed to the reader, which says so (expect_from logs it)
            found.put(e)
        finally:
            found.put(None)

    for _ in range(workers):
        threading.Thread(target=probe_next, name="progress-probe", daemon=True).start()
    try:
        for _ in range(workers):
            while (item := found.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        stop.set()
