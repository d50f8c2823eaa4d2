"""The distillation section of the model card every trl-kd trainer writes (`output_dir/README.md`).

TRL's card (metadata, quick start, citation) is kept; this adds what a reader of a distilled model needs: the
method and paper, the teacher and its revision, the student base, the dataset, every method hyperparameter, who wrote
the training tokens, the final evaluation metrics, the framework versions and the launch command.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from trl import DistillationConfig


# TrainingArguments fields worth showing besides the method's own
_TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_epsilon",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "beta",
    "seed",
)
_PACKAGES = ("trl-kd", "trl", "transformers", "torch", "accelerate", "peft", "datasets", "deepspeed")


@dataclass
class DistillationFacts:
    """What a distilled model's card says about its training, as plain values: each trainer fills one in
    [`KDTrainer.distillation_facts`][trl_kd.KDTrainer.distillation_facts], and the card is written from it alone.

    Attributes:
        method: the method's display name, e.g. `"Speculative KD"`.
        paper: `{"id": arXiv id, "title": ...}` of the method's paper, or `None`.
        teacher: the teacher's Hub id or folder (`"(in-memory model)"` when it has no name).
        teacher_revision: its revision or commit hash, if known.
        student: the student base's Hub id or folder (`None`: a model built in memory).
        steps: optimizer steps taken.
        hyperparameters: field name -> value (see `method_hyperparameters`).
        log_history: the trainer's log rows (`trainer.state.log_history`): the training means and the final evaluation
            are read from them.
        dataset: the dataset's name, if known.
        teacher_cache: `(k, temperature)` of the offline teacher cache trained on, if any.
        extra_lines: markdown lines the method adds at the end (e.g. PromptKD's teacher prompt).
    """

    method: str
    paper: dict[str, str] | None
    teacher: str
    teacher_revision: str | None
    student: str | None
    steps: int
    hyperparameters: dict[str, object]
    log_history: list[dict] = field(default_factory=list)
    dataset: str | None = None
    teacher_cache: tuple[int, float] | None = None
    extra_lines: list[str] = field(default_factory=list)


def method_hyperparameters(args: DistillationConfig) -> dict[str, object]:
    """The fields trl-kd adds to `trl.DistillationConfig` (all of them), then the main training fields."""
    base = {f.name for f in dataclasses.fields(DistillationConfig)}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in base}
    values.update({name: getattr(args, name) for name in _TRAINING_FIELDS if hasattr(args, name)})
    return values


def _mean(history: list[dict], key: str) -> float | None:
    values = [row[key] for row in history if key in row]
    return statistics.mean(values) if values else None


def framework_versions() -> dict[str, str | None]:
    """Installed versions of trl-kd and the stack it runs on (`None`: not installed); for model cards and
    `trl-kd env`."""
    found = {}
    for package in _PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def distillation_section(facts: DistillationFacts) -> str:
    """Markdown appended to TRL's model card."""
    history = facts.log_history
    paper = facts.paper
    lines = ["", "## Distillation", ""]
    if paper:
        lines.append(f"- **Method**: {facts.method} — [{paper['title']}](https://huggingface.co/papers/{paper['id']})")
    else:
        lines.append(f"- **Method**: {facts.method}")
    revision = facts.teacher_revision
    lines.append(f"- **Teacher**: `{facts.teacher}`" + (f" (revision `{revision}`)" if revision else ""))
    if facts.teacher_cache is not None:
        k, temperature = facts.teacher_cache
        lines.append(f"- **Offline teacher cache**: top-{k} log-probabilities at temperature {temperature}")
    lines.append(f"- **Student base**: `{facts.student or '(in-memory model)'}`")
    if facts.dataset:
        lines.append(f"- **Dataset**: `{facts.dataset}`")
    lines.append(f"- **Steps**: {facts.steps}")
    last_tokens = next((row["num_tokens"] for row in reversed(history) if "num_tokens" in row), None)
    if last_tokens is not None:
        lines.append(f"- **Training tokens** (prompts and completions): {int(last_tokens):,}")
    for key, label in (
        ("teacher_token_fraction", "Response tokens written by the teacher"),
        ("acceptance_rate", "Acceptance rate of the student's drafted tokens"),
        ("on_policy_fraction", "Rows trained on student samples"),
    ):
        value = _mean(history, key)
        if value is not None:
            lines.append(f"- **{label}** (mean over training): {value:.3f}")
    evaluation = {k: v for row in history for k, v in row.items() if k.startswith("eval_") and isinstance(v, float)}
    if evaluation:  # the latest value of each metric (`*_before`: before training)
        lines += ["", "### Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(evaluation.items())]
    lines += ["", "### Hyperparameters", "", "| field | value |", "| --- | --- |"]
    lines += [f"| `{k}` | `{v}` |" for k, v in facts.hyperparameters.items()]
    versions = ", ".join(f"{name} {v}" for name, v in framework_versions().items() if v is not None)
    lines += ["", f"Framework versions: {versions}.", ""]
    lines += ["Launch command:", "", "```bash", shlex.join([sys.executable.split("/")[-1], *sys.argv]), "```", ""]
    lines += facts.extra_lines
    return "\n".join(lines)


def student_base(name_or_path: str | None) -> tuple[str | None, str]:
    """`(hub_id, label)` of the student's base model: a Hub id is both; a local folder has no Hub id and is named
    by its folder's name; an in-memory model without a name is `(None, "")`."""
    if not name_or_path:
        return None, ""
    if os.path.isdir(name_or_path):
        return None, os.path.basename(os.path.normpath(name_or_path))
    return name_or_path, name_or_path


def arrange_card(text: str, base: tuple[str | None, str], model_id: str, section: str) -> str:
    """TRL's generated card, corrected for a distilled student: the real base instead of a link to `None` (a local
    base is named, not linked), a quick start that loads `model_id` (this model's repo id or folder) instead of
    `"None"`, and the Distillation `section` placed before the citations."""
    hub_id, label = base
    if hub_id:
        base_text = f"[{hub_id}](https://huggingface.co/{hub_id})"
    else:
        base_text = f"`{label}`" if label else "a model built in memory"
    text = re.sub(
        r"This model is a fine-tuned version of \[[^\]]*\]\([^)]*\)",
        lambda _: f"This model is a fine-tuned version of {base_text}",
        text,
        count=1,
    )
    text = re.sub(
        r'pipeline\("text-generation", model="[^"]*"',
        lambda _: f'pipeline("text-generation", model="{model_id}"',
        text,
        count=1,
    )
    citations = text.find("\n## Citations")
    if citations == -1:
        return text.rstrip("\n") + "\n" + section
    return text[:citations].rstrip("\n") + "\n" + section.rstrip("\n") + "\n\n" + text[citations + 1 :]


def add_distillation_section(path: str, facts: DistillationFacts, model_id: str) -> None:
    """Rewrite TRL's card at `path` (if there is one) for a distilled student: see `arrange_card`, with the
    section built from `facts` and the base read from `facts.student`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(arrange_card(text, student_base(facts.student), model_id, distillation_section(facts)))
