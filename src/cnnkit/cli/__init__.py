"""The command line: parse arguments, call a job (jobs/), print. The only package that exits.

One module per command, each with `add(sub)` (its parser) and `run(args)` (the job's call and its
printing), next to each other; this module gathers them and turns every failure a user can cause
into one line on stderr and a non-zero exit, never a traceback (set CNNKIT_DEBUG=1 to see one).
A new command: one module here, its job in jobs/, its tests."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import CnnkitError, TrainingInterrupted, os_error_message
from . import (audit, augment_preview, compare, embed, evaluate, explain, export, label_issues, lr_find, math, models,
               predict, serve, summary, train, tune)
from .common import EXIT_ERROR, EXIT_INTERRUPTED

COMMANDS = (train, tune, lr_find, summary, math, evaluate, predict, embed, export, serve, audit, compare, label_issues,
            explain, augment_preview, models)  # in the order `cnnkit --help` lists them


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = argparse.ArgumentParser(prog="cnnkit", description="Train, evaluate and use CNN image classifiers.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"cnnkit: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CnnkitError as e:
        print(f"cnnkit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except OSError as e:  # a full disk, a read-only or missing folder: the user's to fix, in one line
        msg = os_error_message(e)
        if msg is None or os.environ.get("CNNKIT_DEBUG"):
            return internal_error(e)
        if e.filename and in_cache(e.filename):
            msg += " (it is cnnkit's cache: set CNNKIT_DATA to a folder on a writable disk)"
        print(f"cnnkit: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug of ours: still one line, with the way to the full traceback
        return internal_error(e)


def in_cache(path) -> bool:
    from ..utils import cache_dir
    try:
        return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(cache_dir())))
    except (TypeError, ValueError):
        return False


def internal_error(e: Exception) -> int:
    if os.environ.get("CNNKIT_DEBUG"):
        raise e
    msg = str(e).splitlines()[0] if str(e) else ""
    print(f"cnnkit: internal error: {type(e).__name__}: {msg} (set CNNKIT_DEBUG=1 for the traceback, "
          "and please report it)", file=sys.stderr)
    return 1

