"""The registry of distillation methods: one `register_method` call per method, in its package's `__init__.py`, and
everything that lists methods reads it (the `trl-kd` command, the example scripts, the tests, the benchmarks).

    # trl_kd/switch/__init__.py
    register_method("switch", SwitchTrainer, SwitchConfig, paper="2410.19503", example="examples/switch.py")

Modelled on PEFT's `register_peft_method`: a new method is its config, its trainer and this one call. The registry
sits at the bottom of the package and imports no trainer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


# words `trl-kd` already uses for its other commands
RESERVED_NAMES = ("plan", "env", "cache-teacher")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the name used everywhere: `trl-kd <name>`, `examples/<name>.py`, the recipes and the docs.
        trainer: the trainer class, a subclass of [`KDTrainer`][trl_kd.KDTrainer].
        config: its config class, a subclass of [`KDConfig`][trl_kd.KDConfig] (what `trainer.config_class` accepts).
        paper: the arXiv id of the method's paper, e.g. `"2410.19503"` (default: the trainer's `_paper["id"]`, TRL's
            model-card citation).
        example: the example script, relative to the repository root (`None`: none ships).
        aliases: other names that resolve to this method (e.g. `kd` for `gkd`).
    """

    name: str
    trainer: type
    config: type
    paper: str | None = None
    example: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        """The method's display name (the trainer's `_name`, as in its model card)."""
        return self.trainer._name


class UnknownMethodError(KeyError):
    """A method name that no `register_method` call registered."""

    def __str__(self) -> str:
        return str(self.args[0])


METHODS: dict[str, Method] = {}
"""The registered methods by name, in registration order: `gkd`, `promptkd`, `skd`, `switch` once `trl_kd` is
imported."""
_ALIASES: dict[str, str] = {}


def register_method(
    name: str,
    trainer: type,
    config: type,
    *,
    paper: str | None = None,
    example: str | None = None,
    aliases: tuple[str, ...] | list[str] = (),
) -> Method:
    """Register a distillation method under `name` (and `aliases`) and return it.

    Registering the same trainer again under the same name is a no-op; a name or alias taken by another method is
    refused.
    """
    aliases = tuple(aliases)
    for word in (name, *aliases):
        if not _NAME.match(word) or word in RESERVED_NAMES:
            raise ValueError(
                f"Method name {word!r} must be lowercase letters, digits and '_', start with a letter, and not be one "
                f"of the `trl-kd` commands {RESERVED_NAMES}."
            )
    # what the rest of trl-kd relies on, checked without importing the trainers (they import this module)
    accepted = getattr(trainer, "config_class", None)
    if not (isinstance(trainer, type) and callable(getattr(trainer, "distillation_facts", None))):
        raise TypeError(f"trainer must be a subclass of trl_kd.KDTrainer, got {trainer!r}.")
    if not (isinstance(config, type) and dataclasses.is_dataclass(config) and isinstance(accepted, type)):
        raise TypeError(f"config must be a dataclass subclass of trl_kd.KDConfig, got {config!r}.")
    if not issubclass(config, accepted):
        raise TypeError(
            f"{trainer.__name__} accepts {accepted.__name__} (its `config_class`), and {config.__name__} is not one: "
            "set `config_class` on the trainer."
        )
    paper = paper or (getattr(trainer, "_paper", None) or {}).get("id")
    method = Method(name, trainer, config, paper, example, aliases)
    for word in (name, *aliases):
        taken = METHODS.get(_ALIASES.get(word, word))
        if taken is not None and (taken.name != name or taken.trainer is not trainer):
            raise ValueError(f"The method name {word!r} is taken by {taken.trainer.__name__}; choose another.")
    if name in METHODS:  # the same method again (a module reloaded): replace its aliases
        unregister_method(name)
    METHODS[name] = method
    _ALIASES.update({alias: name for alias in aliases})
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method and its aliases (for tests and plugins that replace a method)."""
    method = METHODS.pop(get_method(name).name)
    for alias in method.aliases:
        _ALIASES.pop(alias, None)


def get_method(name: str) -> Method:
    """The method registered under `name` or one of its aliases; an unknown name is refused with the choices."""
    method = METHODS.get(_ALIASES.get(name, name))
    if method is None:
        raise UnknownMethodError(f"Unknown method {name!r}; choose one of {', '.join(method_names())}.")
    return method


def method_names(aliases: bool = False) -> list[str]:
    """The registered methods' names, in registration order (with their aliases after them if `aliases`)."""
    names = list(METHODS)
    return names + [a for m in METHODS.values() for a in m.aliases] if aliases else names
