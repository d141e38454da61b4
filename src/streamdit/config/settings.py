"""How a run setting is declared: once, on its `RunConfig` field, with everything derived from it.

Owns: `Setting` (a field's section, one-line help, whether it is a parity key, its flag, the
choices of an enumeration, whether the recipe fills it, and the condition outside which it has
no effect), `setting()` (a dataclass field carrying one), `SECTIONS` (the help groups, in
order), `declared()` (a config class's settings, in field order) and `parity_text`. The CLI's
flags and their help (flags.py), the parity table (`RunConfig.parity_items`) and the no-effect
checks are generated from these declarations; no other list of settings exists.
Imports nothing of streamdit.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SECTIONS: dict[str, str] = {
    "model": "model and weights",
    "geometry": "geometry",
    "sampler": "sampler",
    "recipe": "recipe and KV cache (left out: the recipe's values)",
    "input": "prompts and input",
    "output": "output",
    "compile": "compile",
    "distributed": "distributed",
    "serve": "serve",
}
COMMANDS = ("run", "serve")

# (the config, the command) -> whether the setting does anything; and what it needs, in words
Condition = Callable[[Any, str], bool]


@dataclass(frozen=True, slots=True)
class Setting:
    section: str
    help: str
    parity: bool = False
    """Must be equal on every rank: compared by the startup handshake (parallel/parity.py)."""
    flag: str | None = ""
    """"" = derived from the field name (`--` + dashes, a `_s` unit suffix dropped, `--no-` for a
    switch that defaults on); None = no flag of its own (flags.py sets it another way)."""
    choices: tuple[str, ...] | None = None
    recipe: bool = False
    """Left out, the recipe's value applies (`RunConfig.for_recipe`), so the flag defaults to None."""
    commands: tuple[str, ...] = COMMANDS
    """The subcommands that have this flag."""
    needs: tuple[Condition, str] | None = None
    """The flag, when given, must have an effect: else exit 2 naming it and what it needs."""
    metavar: str | None = None

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"unknown settings section {self.section!r}")


def setting(
    default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **declared: Any
) -> Any:
    """A dataclass field declared as a run setting (see `Setting` for the keywords)."""
    meta = {"setting": Setting(**declared)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Declared:
    name: str
    setting: Setting
    type: Any
    default: Any

    @property
    def section(self) -> str:
        return self.setting.section

    @property
    def flag(self) -> str | None:
        if self.setting.flag is None or self.setting.flag:
            return self.setting.flag
        stem = self.name.removesuffix("_s").replace("_", "-")
        return f"--no-{stem}" if self.default is True else f"--{stem}"

    @property
    def value_type(self) -> type:
        """What the flag's text converts to: int, float, str, Path or bool."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)] or [self.type]
        return args[0]


def declared(cls: type) -> list[Declared]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Declared(f.name, spec, hints[f.name], default))
    return out


def parity_text(value: object) -> str:
    """A setting's value as the handshake compares it (floats exactly, sequences joined)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
