"""Dataset checks and conversions shared by the trainers.

Accepted formats (TRL's): standard or conversational ``prompt`` (prompt-only), ``prompt`` + ``completion``, and
``messages`` (whole conversations; the last message is taken as the completion). Everything is checked when the
trainer is built, not at the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational


def _first_row(dataset: Dataset | IterableDataset) -> dict[str, Any] | None:
    if isinstance(dataset, IterableDataset):
        return next(iter(dataset), None)
    return dataset[0] if len(dataset) else None


def _split_messages(row: dict[str, Any]) -> dict[str, Any]:
    *prompt, last = row["messages"]
    return {"prompt": prompt, "completion": [last]}


def prepare_dataset(
    dataset: Dataset | IterableDataset | None, name: str = "train_dataset"
) -> Dataset | IterableDataset:
    """Check that ``dataset`` is usable for distillation and bring it to ``prompt`` [+ ``completion``] form.

    Raises:
        ValueError: with the fix, when the dataset is missing or empty, has neither a ``prompt`` nor a ``messages``
            column, or has ``messages`` that don't end with an assistant turn.
    """
    if dataset is None:
        raise ValueError(f"`{name}` is required: pass a datasets.Dataset with a `prompt` or `messages` column.")
    first = _first_row(dataset)
    if first is None:
        raise ValueError(f"`{name}` is empty. Pass a dataset with at least one row.")
    columns = list(first.keys())
    if "prompt" in columns:
        if "completion" in columns and is_conversational({"prompt": first["prompt"]}) != is_conversational(
            {"completion": first["completion"]}
        ):
            raise ValueError(
                f"`{name}` mixes formats: `prompt` and `completion` must both be plain strings or both be lists of "
                "messages."
            )
        return dataset
    if "messages" in columns:
        messages = first["messages"]
        if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
            raise ValueError(
                f"`{name}` has a `messages` column whose conversations don't end with an assistant message. Each "
                "conversation must be [..., user turn, assistant answer]; the last message becomes the completion."
            )
        remove = [c for c in columns if c == "messages"]
        return dataset.map(_split_messages, remove_columns=remove)
    raise ValueError(
        f"`{name}` has columns {columns}, but distillation needs a `prompt` column (optionally with `completion`) or "
        "a `messages` column. Rename your columns, e.g. `dataset.rename_column('question', 'prompt')`."
    )


def check_prompt_lengths(
    dataset: Dataset | IterableDataset,
    tokenize: Callable[[list[Any]], list[list[int]]],
    max_prompt_length: int,
    name: str = "train_dataset",
    batch_size: int = 1000,
) -> None:
    """Raise if any prompt tokenizes to more than ``max_prompt_length`` tokens (map-style datasets only)."""
    if isinstance(dataset, IterableDataset):
        return
    for start in range(0, len(dataset), batch_size):
        prompts = dataset[start : start + batch_size]["prompt"]
        for offset, ids in enumerate(tokenize(prompts)):
            if len(ids) > max_prompt_length:
                raise ValueError(
                    f"Row {start + offset} of `{name}` has a prompt of {len(ids)} tokens, longer than the limit of "
                    f"{max_prompt_length}. Filter long prompts out of the dataset, or raise `max_prompt_length`."
                )


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
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        ids = tokenizer(text=text, add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        if token in eos_token_ids:
            ids = ids[: i + 1]
            break
    else:
        ids = ids + [eos_token_ids[0]]
    return ids if max_length is None else ids[:max_length]
