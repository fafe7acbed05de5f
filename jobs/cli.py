"""`quovadis` command line. Parses, sets up logging, runs one job, maps the outcome to an exit code.

Exit status: 0 every input succeeded; 1 some inputs failed (the rest were done, see report.json);
2 usage error (bad option, bad argument); 3 the job could not run (output directory locked by
another job, missing weights, an unexpected error).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from quovadis import __version__
from quovadis.jobs import options
from quovadis.pipeline.errors import ConfigError, QuovadisError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_CANNOT_RUN = 0, 1, 2, 3

# subcommand -> help; jobs/options.py has <name>(parser) adding its arguments, jobs/<name>.py (bench:
# jobs/bench/) has run(args) -> JobReport | int | None
COMMANDS: dict[str, str] = {
    "preprocess": "decode videos to 25 fps and write sharded HDF5 clips (rgb, flow)",
    "extract": "per-clip two-stream I3D features of videos (or preprocess shards) into HDF5 or npy",
    "inflate": "inflate 2D GoogLeNet-BN (or --net resnet50) weights, torchvision layout, into I3D (or I3D-ResNet-50) weights",
    "train": "train one of the paper's architectures (--arch, default I3D: one stream) on labelled videos with Ray Train",
    "evaluate": "top-1/top-5 of trained runs of any --arch in one table, and the two-stream fusion of I3D rgb and flow",
    "bench": "benchmarks behind BENCHMARKS.md (decode, shards, flow, i3d, ...)",
    "show": "contact sheet PNG of a stored video: RGB frames beside their flow (Middlebury colours)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed but only `command`'s options added, so that only
    its job module is imported (the CLI starts without the others' torch, Ray, cv2, h5py)."""
    parser = argparse.ArgumentParser(prog="quovadis", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"quovadis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(options, name)(p)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option (the
    top-level options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _module(name: str):
    return importlib.import_module(f"quovadis.jobs.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("quovadis")
    try:
        outcome = _module(args.command).run(args)
    except ConfigError as e:
        parser.error(str(e))  # exits with EXIT_USAGE
    except QuovadisError as e:
        log.error("%s", e)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        log.error("interrupted; a re-run resumes where this one stopped")
        return EXIT_CANNOT_RUN
    except Exception as e:  # a bug or an environment we did not foresee: one line, not a traceback
        log.error("unexpected error: %s: %s (run with --verbose for the traceback)", type(e).__name__, e)
        log.debug("traceback of the unexpected error", exc_info=True)
        return EXIT_CANNOT_RUN
    if isinstance(outcome, int):
        return outcome
    if outcome is not None and outcome.failed:
        return EXIT_SOME_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
