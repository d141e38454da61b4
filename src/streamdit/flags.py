"""The `run` / `serve` flags, generated from `RunConfig`'s declared settings, and their translation.

Owns: `add_run_flags` (one flag per declared setting of the command, in argument groups by
section, with its help, default and choices; plus the few flags that set a field another way:
`--steps` / `--step-list`, `--no-kv-recompute`, `--use-ema`, and `--log-level`, which is not a
setting), `config_from_args` (the recipe's defaults, then the flags the user gave on top: a
recipe-filled flag left out takes the recipe's value), `check_no_effect` (a flag the user gave
that the chosen mode would ignore is an exit-2 error naming it, never silently dropped),
`DefaultsHelp`, `LOG_LEVELS` and `SERVE_OUT`. Imports config and recipes only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamdit.config import (
    SECTIONS,
    Declared,
    RunConfig,
    declared,
    is_tty_allowed,
    read_test_hooks,
)
from streamdit.errors import ConfigError
from streamdit.recipes import RECIPES

SERVE_OUT = Path("out/serve/stream.mp4")  # serve without --out: flight records go beside it
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# the flags of this module that set a field another way, and the field they set
DERIVED_FIELD = {
    "steps": "denoising_step_list",
    "step_list": "denoising_step_list",
    "no_kv_recompute": "recompute",
    "use_ema": "checkpoint_select",
}
# ... and their no-effect rules: (dest, the setting they need given, in words)
DERIVED_NEEDS = {"use_ema": ("checkpoint", "--checkpoint")}


class DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each flag's default (left out where there is none to show)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = (
            action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS
        )
        shown = not hidden and action.option_strings
        return f"{text} (default: %(default)s)" if shown and "%(default)" not in text else text


def add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    """Every flag of `command` ("run" or "serve"), grouped by section."""
    groups = {name: p.add_argument_group(title) for name, title in SECTIONS.items()}
    for d in declared(RunConfig):
        if d.flag is not None and command in d.setting.commands:
            _add_setting(groups[d.section], d)
    sampler, recipe = groups["sampler"], groups["recipe"]
    sampler.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="denoising steps, spaced by the recipe's schedule (default: the recipe's)",
    )
    sampler.add_argument(
        "--step-list",
        type=_int_list,
        default=None,
        metavar="T,T,...",
        help="explicit timesteps instead, e.g. 1000,750,500,250",
    )
    recipe.add_argument("--no-kv-recompute", action="store_true", help="same as --recompute off")
    groups["model"].add_argument(
        "--use-ema", action="store_true", help="the EMA weights (generator_ema) of a checkpoint"
    )
    groups["output"].add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS, help="log detail"
    )


def _add_setting(group: argparse._ArgumentGroup, d: Declared) -> None:
    s = d.setting
    if d.value_type is bool:
        action = "store_false" if d.default is True else "store_true"
        group.add_argument(d.flag, dest=d.name, action=action, default=d.default, help=s.help)
        return
    group.add_argument(
        d.flag,
        dest=d.name,
        type=d.value_type,
        default=None if s.recipe else d.default,
        choices=list(s.choices) if s.choices else None,
        metavar=s.metavar or (None if s.choices else _metavar(d)),
        help=s.help + (" (default: the recipe's)" if s.recipe else ""),
    )


def _metavar(d: Declared) -> str:
    if d.name.endswith("_s"):
        return "SECONDS"
    return {Path: "PATH", int: "N", float: "X"}.get(d.value_type, "TEXT")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def config_from_args(args: argparse.Namespace) -> RunConfig:
    command = getattr(args, "command", "run")
    values: dict[str, object] = {}
    for d in declared(RunConfig):
        if d.flag is None or command not in d.setting.commands:
            continue
        value = getattr(args, d.name)
        if not (d.setting.recipe and value is None):  # left out: the recipe's value
            values[d.name] = value
    values.update(_derived(args))
    return RunConfig.for_recipe(str(values.pop("recipe")), **values)


def _derived(args: argparse.Namespace) -> dict[str, object]:
    """The fields set by flags that are not their own setting, and by the environment."""
    recipe = RECIPES[args.recipe]
    given: dict[str, object] = {"test_hooks": read_test_hooks()}
    if args.step_list is not None:
        given["denoising_step_list"] = tuple(args.step_list)
    elif args.steps is not None:
        given["denoising_step_list"] = recipe.step_list(args.steps)
    if args.no_kv_recompute:
        given["recompute"] = "off"
    if args.use_ema and args.checkpoint_select not in (None, "ema"):
        raise ConfigError("--use-ema and --checkpoint-select name different weights [field=use_ema]")
    if args.use_ema:
        given["checkpoint_select"] = "ema"
    if args.out is None:  # serve records a video only when --out is given
        given["out"] = SERVE_OUT
    given["progress"] = args.progress and is_tty_allowed()
    return given


def check_no_effect(cfg: RunConfig, command: str, given: set[str]) -> None:
    """ConfigError for the first flag the user gave that would do nothing here."""
    for d in declared(RunConfig):
        if d.name in given and d.setting.needs is not None and not d.setting.needs[0](cfg, command):
            raise ConfigError(f"{d.flag} has no effect here: it needs {d.setting.needs[1]} [field={d.name}]")
    for dest, (field, needs) in DERIVED_NEEDS.items():
        if dest in given and getattr(cfg, field) is None:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} has no effect here: it needs {needs} [field={dest}]")


def markdown_reference() -> str:
    """docs/flags.md: every flag of `run` and `serve` by section, as `--help` shows them (a test
    keeps the committed file equal to this)."""
    parser = argparse.ArgumentParser(prog="streamdit")
    sub = parser.add_subparsers()
    parsers = {command: sub.add_parser(command) for command in ("run", "serve")}
    for command, p in parsers.items():
        add_run_flags(p, command)
    lines = [
        "# `streamdit run` / `streamdit serve` flags",
        "",
        "Generated from the settings declared on `RunConfig` (`src/streamdit/config/run.py`) by",
        "`python -m streamdit.flags > docs/flags.md`; `tests/unit/test_flags.py` keeps it current.",
        "Parity keys must be equal on every rank (compared at startup). A flag whose",
        "*needs* do not hold is refused with exit 2, naming it.",
    ]
    by_dest = {d.name: d for d in declared(RunConfig)}
    for group in parsers["serve"]._action_groups[2:]:  # after positionals / options
        lines += ["", f"## {group.title}", "", "| flag | default | parity | meaning |", "|---|---|---|---|"]
        for action in group._group_actions:
            d = by_dest.get(action.dest)
            if d is not None and d.setting.commands == ("serve",):
                meaning = f"serve only: {action.help}"
            else:
                meaning = action.help or ""
            needs = d.setting.needs[1] if d is not None and d.setting.needs else None
            if action.dest in DERIVED_NEEDS:
                needs = DERIVED_NEEDS[action.dest][1]
            if needs:
                meaning += f"; needs {needs}"
            flag = action.option_strings[0] + ("" if action.nargs == 0 else f" {_shown_metavar(action)}")
            default = None if isinstance(action.default, bool) else action.default
            sets = by_dest.get(DERIVED_FIELD.get(action.dest, action.dest))
            parity = "yes" if sets is not None and sets.setting.parity else ""
            lines.append(f"| `{_cell(flag)}` | {_cell(default)} | {parity} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def _shown_metavar(action: argparse.Action) -> str:
    if action.choices:
        return "|".join(map(str, action.choices))
    return str(action.metavar or action.dest.upper())


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|")


if __name__ == "__main__":
    print(markdown_reference(), end="")
