"""One progress bar per job, as a person watches it: video-seconds done against the total known
from probing, with the rate (video-seconds per wall-second, i.e. times real time) and an ETA.

While the bar is open, log records print above it (tqdm's logging redirect) instead of breaking
it. The bar is off where stderr is not a terminal (tqdm's disable=None).
"""

from __future__ import annotations

import contextlib
import logging

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


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

    def __enter__(self) -> Progress:
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
        self._redirect.__enter__()
        self._bar = tqdm(total=0.0, desc=self.desc, unit="video-s", disable=self.disable, dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} video-s "
                                    "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
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
