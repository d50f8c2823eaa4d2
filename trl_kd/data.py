"""Input checks and conversions shared by the trainers: datasets, and the teacher's tokenizer against the student's.

Accepted formats (TRL's): standard or conversational ``prompt`` (prompt-only), ``prompt`` + ``completion``, and
``messages`` (whole conversations; the last message is taken as the completion). Everything is checked when the
trainer is built, not at the first step.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Log `message` as a warning the first time only (a fallback taken on every row would flood the log)."""
    logger.warning(message)


def _first_row(dataset: Dataset | IterableDataset) -> dict[str, Any] | None:
    if isinstance(dataset, IterableDataset):
        return next(iter(dataset), None)
    return dataset[0] if len(dataset) else None


def _split_messages(row: dict[str, Any]) -> dict[str, Any]:
    *prompt, last = row["messages"]
    return {"prompt": prompt, "completion": [last]}


def _kind(value: Any) -> str:
    return "messages" if isinstance(value, list) else "text"


def _messages_problem(messages: Any, column: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"`{column}` must be a non-empty list of messages, got {type(messages).__name__} {messages!r:.60}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} of `{column}` must be a dict with a string `role`, got {message!r:.60}"
        if not isinstance(message.get("content"), str):
            return (
                f"message {i} of `{column}` has {type(message.get('content')).__name__} content; trl-kd trains "
                "text-only models, so `content` must be a string"
            )
    return None


def row_problem(row: dict[str, Any], prompt_kind: str | None) -> str | None:
    """What is wrong with one row (in `prompt` [+ `completion`] or `messages` form), or `None`. `prompt_kind` is the
    first row's format (`"text"` or `"messages"`), which every row must share."""
    if "messages" in row and "prompt" not in row:
        messages = row["messages"]
        problem = _messages_problem(messages, "messages")
        if problem:
            return problem
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            return (
                f"the conversation {roles} does not end with an assistant answer after at least one other turn "
                "(the last message becomes the completion)"
            )
        return None
    prompt = row.get("prompt")
    if not isinstance(prompt, (str, list)):
        return f"`prompt` must be a string or a list of messages, got {type(prompt).__name__} {prompt!r:.60}"
    if isinstance(prompt, list) and (problem := _messages_problem(prompt, "prompt")):
        return problem
    if prompt_kind is not None and _kind(prompt) != prompt_kind:
        return f"`prompt` is {_kind(prompt)} but the first row's is {prompt_kind}: every row must use one format"
    completion = row.get("completion")
    if completion is None:  # no completion: the row is generated on-policy
        return None
    if not isinstance(completion, (str, list)):
        return (
            f"`completion` must be a string, a list of messages or None, got {type(completion).__name__} "
            f"{completion!r:.60}"
        )
    if isinstance(completion, list) and (problem := _messages_problem(completion, "completion")):
        return problem
    if _kind(completion) != _kind(prompt):
        return "`prompt` and `completion` mix formats: they must both be plain strings or both be lists of messages"
    return None


def _raise_for_row(index: int, name: str, problem: str) -> None:
    raise ValueError(f"Row {index} of `{name}`: {problem}. Fix or drop that row, e.g. with `dataset.filter(...)`.")


def check_rows(dataset: Dataset | IterableDataset, name: str = "train_dataset", batch_size: int = 1000):
    """Check every row with [`row_problem`][trl_kd.data.row_problem]: all of a map-style dataset now, in batches of
    columns; an `IterableDataset` row by row as it streams (returned wrapped). The error names the first bad row's
    index and column."""
    first = _first_row(dataset)
    kind = _kind(first["prompt"]) if first is not None and "prompt" in first else None
    if isinstance(dataset, IterableDataset):

        def check(row: dict[str, Any], index: int) -> dict[str, Any]:
            if (problem := row_problem(row, kind)) is not None:
                _raise_for_row(index, name, problem)
            return {}

        return dataset.map(check, with_indices=True)
    columns = [c for c in ("prompt", "completion", "messages") if c in dataset.column_names]
    selected = dataset.select_columns(columns)
    for start in range(0, len(dataset), batch_size):
        batch = selected[start : start + batch_size]
        for offset, values in enumerate(zip(*(batch[c] for c in columns))):
            if (problem := row_problem(dict(zip(columns, values)), kind)) is not None:
                _raise_for_row(start + offset, name, problem)
    return dataset


def prepare_dataset(
    dataset: Dataset | IterableDataset | None, name: str = "train_dataset"
) -> Dataset | IterableDataset:
    """Check that ``dataset`` is usable for distillation, every row of it (see `check_rows`), and bring it to
    ``prompt`` [+ ``completion``] form.

    Raises:
        ValueError: with the fix, when the dataset is missing or empty, has neither a ``prompt`` nor a ``messages``
            column, or has a bad row (the first one is named: its index, column and what is wrong).
    """
    if dataset is None:
        raise ValueError(f"`{name}` is required: pass a datasets.Dataset with a `prompt` or `messages` column.")
    first = _first_row(dataset)
    if first is None:
        raise ValueError(f"`{name}` is empty. Pass a dataset with at least one row.")
    columns = list(first.keys())
    if "prompt" not in columns and "messages" not in columns:
        raise ValueError(
            f"`{name}` has columns {columns}, but distillation needs a `prompt` column (optionally with `completion`) "
            "or a `messages` column. Rename your columns, e.g. `dataset.rename_column('question', 'prompt')`."
        )
    dataset = check_rows(dataset, name)
    if "prompt" in columns:
        return dataset
    return dataset.map(_split_messages, remove_columns=["messages"])


def each_dataset(check: Callable[[Any, str], Any], datasets: Any, name: str) -> Any:
    """`check(dataset, name)` on a dataset, or on each dataset of a dict (TRL's `eval_dataset` may be either, named
    `name[key]`); `None` stays `None`."""
    if isinstance(datasets, dict):
        return {key: check(dataset, f"{name}[{key!r}]") for key, dataset in datasets.items()}
    return None if datasets is None else check(datasets, name)


def context_lengths(prefix_tokens: int = 0, **models: PreTrainedModel | None) -> dict[str, int]:
    """Longest `prompt + completion` each model can place, by role (`None` models, and models whose config names no
    limit, left out); the teacher's is reduced by `prefix_tokens` (a soft prompt it sees before each prompt)."""
    limits = {}
    for role, model in models.items():
        config = None if model is None else model.config.get_text_config()
        context = config and (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None))
        if context:
            limits[role] = context - (prefix_tokens if role == "teacher" else 0)
    return limits


def prompt_length_limit(
    context_limits: dict[str, int], max_completion_length: int, max_prompt_length: int | None, prefix_tokens: int = 0
) -> int | None:
    """The longest prompt a row may have: `max_prompt_length`, else the smallest model context (by role, as
    `context_lengths` gives them) less the completion; `None` when neither is known. Refuses settings that
    leave no room for a prompt, naming the fix. `prefix_tokens` (a teacher's soft prompt) is only named in the
    message: the teacher's limit already excludes it."""
    for role, context in context_limits.items():
        room = f"the {role}'s context of {context} tokens"
        if role == "teacher" and prefix_tokens:
            room += f" (left after its {prefix_tokens} soft-prompt tokens)"
        if context - max_completion_length <= 0:
            raise ValueError(
                f"`max_completion_length` ({max_completion_length}) leaves no room for a prompt in {room}. Lower "
                f"`max_completion_length` (e.g. `max_completion_length={max(context // 2, 1)}`)."
            )
        if max_prompt_length is not None and max_prompt_length + max_completion_length > context:
            raise ValueError(
                f"`max_prompt_length` ({max_prompt_length}) + `max_completion_length` ({max_completion_length}) "
                f"exceeds {room}. Lower `max_prompt_length` to at most {context - max_completion_length}."
            )
    if max_prompt_length is not None:
        return max_prompt_length
    return min(context_limits.values()) - max_completion_length if context_limits else None


def check_prompt_lengths(
    dataset: Dataset | IterableDataset,
    tokenize: Callable[[list[Any]], list[list[int]]],
    max_prompt_length: int | None,
    name: str = "train_dataset",
    batch_size: int = 1000,
) -> Dataset | IterableDataset:
    """Raise if any prompt tokenizes to more than ``max_prompt_length`` tokens: every row of a map-style dataset now,
    an `IterableDataset` row by row as it streams (returned wrapped). With no limit known, warns and checks nothing.
    """
    if max_prompt_length is None:
        logger.warning(
            "Neither model's config names a context length (`max_position_embeddings` or `n_positions`), so the "
            "prompts of %s were not checked against one; set `max_prompt_length` to check them.",
            name,
        )
        return dataset

    def check(index: int, ids: list[int]) -> None:
        if len(ids) > max_prompt_length:
            raise ValueError(
                f"Row {index} of `{name}` has a prompt of {len(ids)} tokens, longer than the limit of "
                f"{max_prompt_length}. Filter long prompts out of the dataset, or raise `max_prompt_length`."
            )

    if isinstance(dataset, IterableDataset):

        def check_row(row: dict[str, Any], index: int) -> dict[str, Any]:
            check(index, tokenize([row["prompt"]])[0])
            return {}

        return dataset.map(check_row, with_indices=True)
    prompts = dataset.select_columns(["prompt"])  # slicing the dataset would read every column of the rows
    for start in range(0, len(dataset), batch_size):
        for offset, ids in enumerate(tokenize(prompts[start : start + batch_size]["prompt"])):
            check(start + offset, ids)
    return dataset


def completion_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, Any]],
    prompt_ids: Sequence[int],
    completion: str | list[dict[str, Any]],
    eos_token_ids: Sequence[int],
    max_length: int | None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a dataset completion as it follows ``prompt_ids``, ended by EOS and cut to ``max_length``.

    The prompt and completion are tokenized together and the prompt's tokens removed, so token boundaries match what
    a model sees at inference; conversational rows go through the chat template. Everything after the first EOS (e.g.
    the newline a chat template adds after ``<|im_end|>``) is dropped, as it is from generated completions.
    """
    if isinstance(completion, list):
        full = tokenizer.apply_chat_template(
            list(prompt) + list(completion), tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )["input_ids"]
    else:
        full = tokenizer(text=prompt + completion)["input_ids"]
    prompt_ids = list(prompt_ids)
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids) :]
    else:  # the template or the tokenizer merges across the boundary: fall back to the completion alone
        warn_once(
            "A dataset completion could not be tokenized together with its prompt (the prompt's tokens change when "
            "the completion follows: the tokenizer merges across the boundary, or the chat template renders the "
            "prompt otherwise), so such completions are tokenized alone. End prompts on a token boundary (e.g. a "
            "space or newline) to train on the tokens the model sees at inference."
        )
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        ids = tokenizer(text=text, add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        if token in eos_token_ids:
            ids = ids[: i + 1]
            break
    else:
        ids = ids + [eos_token_ids[0]]
    return ids if max_length is None else ids[:max_length]


# letters, digits, code, whitespace runs, accents, CJK and an emoji: where tokenizers of different families part ways
TOKENIZER_PROBE = (
    "Distillation, step 1: 12345 + 0.5 = ?\n\tdef f(x):  return x ** 2  # naïve café, Ünïcode; "
    "日本語のテキスト 🙂 <br/> https://example.org/a?b=c"
)


def tokenizer_mismatch(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> str | None:
    """How `teacher` tokenizes differently from `student` (on `TOKENIZER_PROBE`, or a special token of the
    student's with another id), or `None` when they agree."""
    ours = student(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    theirs = teacher(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        ours_at = f"{ours[at]} ({student.convert_ids_to_tokens(ours[at])!r})" if at < len(ours) else "the end"
        theirs_at = f"{theirs[at]} ({teacher.convert_ids_to_tokens(theirs[at])!r})" if at < len(theirs) else "the end"
        return (
            f"a probe text encodes to {len(ours)} tokens for the student and {len(theirs)} for the teacher, first "
            f"differing at token {at}: {ours_at} vs {theirs_at}"
        )
    for token in student.all_special_tokens:
        ours_id, theirs_id = student.convert_tokens_to_ids(token), teacher.convert_tokens_to_ids(token)
        if ours_id != theirs_id:
            return f"the special token {token!r} is id {ours_id} for the student and {theirs_id} for the teacher"
    return None


def check_vocabularies(tokenizer: PreTrainedTokenizerBase, **models: PreTrainedModel | None) -> int:
    """The size of the vocabulary the distributions are compared over (the tokenizer's), after checking that every
    model (by role, e.g. `student=`, `teacher=`; `None`: no such model) can score each of its tokens."""
    tokenizer_size = len(tokenizer)
    for role, model in models.items():
        if model is None:  # e.g. no teacher: an offline cache stands in for it
            continue
        vocab = model.config.get_text_config().vocab_size
        if vocab < tokenizer_size:
            raise ValueError(
                f"The {role} model has a vocabulary of {vocab} tokens but the tokenizer has {tokenizer_size}, so "
                f"the {role} cannot score every token. Teacher and student must share the tokenizer (same model "
                "family); if you added tokens, call `model.resize_token_embeddings(len(tokenizer))` on both. For "
                "models with different tokenizers use cross-tokenizer distillation (TRL's GOLD trainer)."
            )
    return tokenizer_size


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(source: str | None, need: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved at `source` (a folder or Hub id); `need` starts the error when there is none."""
    from transformers import AutoTokenizer

    fix = "pass it as `teacher_processing_class`, or save it in the teacher's folder"
    if not source:
        raise ValueError(f"{need}, and the teacher was given as a model object: {fix}.")
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, n)) for n in TOKENIZER_FILES):
        raise ValueError(f"{need}, and the teacher's folder {source} holds none: {fix}.")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # offline, no tokenizer files on the Hub, ...
        raise ValueError(
            f"{need}, and it could not be loaded from {source} ({type(error).__name__}): {fix}."
        ) from None


def check_teacher_tokenizer(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    source: str | None,
) -> None:
    """Refuse a teacher whose tokenizer disagrees with the student's (see `KDConfig.check_teacher_tokenizer`). The
    teacher's tokenizer is `teacher_tokenizer`, else the one saved with the teacher at `source`, if it can be
    loaded; when neither is there, a warning says the check was skipped."""
    if teacher_tokenizer is None and source and os.path.isdir(source):
        if not any(os.path.exists(os.path.join(source, name)) for name in TOKENIZER_FILES):
            # `AutoTokenizer` would build an empty tokenizer from the model config alone
            logger.warning(
                "The teacher's folder %s holds no tokenizer, so it was not compared with the "
                "student's; pass `teacher_processing_class` to compare them.",
                source,
            )
            return
    if teacher_tokenizer is None and source:
        from transformers import AutoTokenizer

        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as error:  # no tokenizer files, offline, ...
            logger.warning(
                "Could not load the teacher's tokenizer from %s (%s), so it was not compared with the "
                "student's; pass `teacher_processing_class` to compare them.",
                source,
                type(error).__name__,
            )
    if teacher_tokenizer is None:
        return
    problem = tokenizer_mismatch(student_tokenizer, getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer))
    if problem is not None:
        raise ValueError(
            f"The teacher's tokenizer{f' ({source})' if source else ''} does not match the student's: {problem}. "
            "The teacher's distributions would be over other tokens. Use a teacher of the student's model family "
            "(the same tokenizer), or TRL's GOLD trainer for cross-tokenizer distillation; if the two tokenizers "
            "assign the same ids on purpose, set `check_teacher_tokenizer=False`."
        )
