"""An error nobody foresaw ends the command with exit 3 and one line, never a raw traceback."""

from __future__ import annotations

import logging

from quovadis.jobs import preprocess
from quovadis.jobs.cli import EXIT_CANNOT_RUN, main


def test_unexpected_error_exits_3_with_one_line(tmp_path, monkeypatch, caplog):
    def broken(args):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(preprocess, "run", broken)
    with caplog.at_level(logging.DEBUG, logger="quovadis"):
        code = main(["preprocess", str(tmp_path / "a.mp4"), "--out", str(tmp_path / "out")])
    assert code == EXIT_CANNOT_RUN
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "RuntimeError" in message and "disk controller on fire" in message and "\n" not in message
    assert errors[0].exc_info is None  # the traceback goes only to the debug log
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)
