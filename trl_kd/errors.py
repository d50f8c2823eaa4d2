"""User-facing error helpers, at the bottom of the package so that every floor can use them: whether a name is
meant as a local folder that does not exist, the first line of an exception, and argparse parsers that fail in one
line."""

from __future__ import annotations

import argparse
import os


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser.error` print only `prog: error: message` and exit 2: TrlParser's usage runs to hundreds of
    lines, which buries the one that says what is wrong."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see `{parser.prog} --help`)\n")

    parser.error = error
    return parser


def missing_folder(name: str) -> bool:
    """`name` is meant as a local path (it starts with `.`, `/` or `~`, or has more than one `/`, unlike a Hub id
    `org/name`) and no such folder exists."""
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    return local and not os.path.isdir(os.path.expanduser(name))


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
