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


def _offline() -> bool:
    import huggingface_hub

    return huggingface_hub.is_offline_mode()


def read_as(name: str) -> str:
    """How a model or dataset name was read: as a local folder or, when there is none, as a Hub id."""
    if os.path.isdir(os.path.expanduser(name)):
        return "read as a local folder"
    if missing_folder(name):
        return "no such folder"
    offline = " (offline: HF_HUB_OFFLINE is set)" if _offline() else ""
    return f"read as a Hub id{offline}, since there is no local folder of that name"


def missing_model(name: str, revision: str | None = None, ask_hub: bool = True) -> str | None:
    """Why the model `name` cannot be found, in words that say how it was read, or `None` when it can be (a local
    folder that exists, or a Hub repository that exists or is in the local Hub cache). A Hub id is only checked for
    existence: one request online (none with `ask_hub=False`, which leaves an online Hub id to its loader), none
    offline."""
    import huggingface_hub

    if os.path.isdir(os.path.expanduser(name)):
        return None
    if missing_folder(name):
        return "no such folder (a Hub id looks like 'Qwen/Qwen2.5-0.5B-Instruct')"
    if not ask_hub and not _offline():
        return None
    try:
        if _offline():
            files = ("config.json", "adapter_config.json")
            cached = (huggingface_hub.try_to_load_from_cache(name, f, revision=revision) for f in files)
            if any(isinstance(path, str) for path in cached):
                return None
            return f"{read_as(name)}, and it is not in the local Hub cache"
        if huggingface_hub.repo_exists(name):
            return None
    except Exception as error:  # no connection, a malformed id, ...: what the Hub client said
        return f"{read_as(name)}, and the Hub could not be asked: {first_line(error)}"
    return f"{read_as(name)}, and the Hub has no such model (or it is private or gated: `hf auth login`)"


def check_models_found(**models: tuple[object, str | None]) -> None:
    """Before anything loads, raise for the first `argument=(name, revision)` whose name is a `str` that cannot be
    found (a local name that is no folder, or, offline, a Hub id not in the cache), naming the argument. Loaded
    models and online Hub ids are left to their loader."""
    for argument, (name, revision) in models.items():
        problem = missing_model(name, revision, ask_hub=False) if isinstance(name, str) else None
        if problem:
            raise ValueError(f"`{argument}` {name!r}: {problem}.")
