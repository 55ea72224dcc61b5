"""The `stitched-llama` command line: build, train, evaluate, export and chat with a palette of stitched models.

    stitched-llama build SMALL LARGE --out palette --calibration domain.txt   # palette + least-squares stitches
    stitched-llama train palette --train-file train.jsonl --output-dir run --max-steps 2000   # ESTA, merged
    stitched-llama evaluate run/palette --data val.jsonl --out run/eval     # Pareto table + plot
    stitched-llama export run/palette --stitch best --max-params 1.5B --out slim   # one stitch alone
    stitched-llama chat run/palette --stitch 3                              # talk to any stitch, switch live
    stitched-llama demo                                                     # all of it on the built-in family

User errors (a missing or incomplete folder, an unknown stitch, a bad budget...) end with the command's usage and
one line on stderr, exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import build, chat, demo, evaluate, export, train
from ._common import EXIT_USAGE, FORMATTER, CliError, one_line

COMMANDS = (build, train, evaluate, export, chat, demo)  # each: add_parser(subparsers) and run(args) -> int

__all__ = ["CliError", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stitched-llama")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stitched-llama", description=__doc__, formatter_class=FORMATTER, allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    parser.add_argument("--verbose", action="store_true", help="show the library's info logs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # `train` gets its own parser (all TrainingArguments flags): hand it everything after the command name.
    position = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if position is not None and argv[position] == "train":
        args = parser.parse_args(argv[: position + 1])
        args.train_argv = argv[position + 1 :]
    else:
        args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Raised by transformers' own Trainer/peft calls, not by anything the user can change.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    if args.verbose:
        hf_logging.set_verbosity_info()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as error:
        if args.debug:
            raise
        # As argparse reports its own errors: the command's usage, then one line saying what is wrong.
        print(args.command_parser.format_usage().rstrip(), file=sys.stderr)
        print(f"stitched-llama {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
