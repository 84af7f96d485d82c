"""``trl-video train``'s parser: ``trl.TrlParser`` over :class:`~trl_video.config.VideoRewardConfig`.

The recipe YAML sets the parser's defaults (``TrlParser.set_defaults_with_config``, as TRL's ``--config`` does)
and every config field is also a flag (``--learning_rate 1e-3``, ``--output-dir D``) that overrides it
(``HfArgumentParser.parse_args_into_dataclasses``). Around TRL's parser, kept from the earlier CLI because users rely
on it (what TrlParser does differently is listed in docs/architecture.md):

* ``--recipe R.yaml`` (``--config`` is accepted too) is read by :func:`trl_video.cli.load_recipe`: a missing file,
  invalid YAML or a non-mapping is a one-line error naming the file (TrlParser raises ``FileNotFoundError`` /
  ``yaml`` errors / ``ValueError``);
* ``--set key=value`` reaches into mappings (``--set method_args.kl_weight=0.1``); TRL has no such flag;
* recipe keys are checked before TRL sees them: unknown keys get a "did you mean", wrong types name the key, and
  the deprecated ``use_lora`` / ``lora_rank`` are renamed with a note (TrlParser reports unknown config keys as
  one list, and argparse converts a string default such as ``use_lora: "yes"`` silently to a bool);
* argparse's ``error()`` (which prints usage and raises ``SystemExit(2)``) raises a ``TrlVideoError`` instead, so
  the CLI prints one ``error:`` line; unknown flags get a "did you mean";
* the recipe's ``env:`` mapping of TrlParser is not supported (environment variables set from a recipe would be
  recorded in checkpoints and model cards, and may hold secrets).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from trl import TrlParser

from .cli import apply_overrides, load_recipe
from .config import BOUNDS, VideoRewardConfig, check_fields
from .errors import ConfigError, TrlVideoError

#: flags of ``trl-video train`` that are not config fields
EXTRA_FLAGS = ("--recipe", "--config", "--set", "--resume", "--accept-recipe-changes", "--dry-run")


@dataclass
class TrainArgs:
    config: VideoRewardConfig
    recipe: dict[str, Any]  # what the user set (recipe + --set + flags), recorded in checkpoints and the model card
    recipe_path: str | None = None
    resume: bool | str = False  # True: the latest checkpoint; a path: that checkpoint
    dry_run: bool = False
    accept_recipe_changes: bool = False


def _mapping(text: str) -> dict[str, Any]:
    """A ``dict`` field given as a flag: a YAML/JSON mapping (``--method_args '{kl_weight: 0.1}'``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {text!r}")
    return value


class RecipeParser(TrlParser):
    """``trl.TrlParser`` for ``VideoRewardConfig`` plus ``--recipe``, ``--set``, ``--resume``, ``--dry-run``; argparse
    errors raise :class:`~trl_video.errors.TrlVideoError`."""

    def __init__(self, prog: str = "trl-video train") -> None:
        super().__init__(VideoRewardConfig, prog=prog, allow_abbrev=False,  # type: ignore[arg-type]
                         description="Train from a YAML recipe; every recipe key is also a flag (flags win).")
        self.add_argument("--recipe", "--config", dest="recipe", metavar="R.yaml",
                          help="YAML mapping of the fields below (TRL's --config)")
        self.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                          help="override a recipe key; dotted keys reach into mappings (method_args.kl_weight=0.1)")
        self.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                          help="continue from the latest checkpoint in the output dir (or the checkpoint named)")
        self.add_argument("--accept-recipe-changes", action="store_true",
                          help="resume although the recipe differs from the checkpoint's (recorded in the metrics)")
        self.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; load no weights")

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:  # type: ignore[override]
        # bounds (ge/gt/...) are ours, not argparse keywords; dict fields read a YAML mapping from the flag
        meta = {k: v for k, v in field.metadata.items() if k not in BOUNDS}
        field = copy.copy(field)
        field.metadata = types.MappingProxyType(meta)
        if typing.get_origin(field.type) is dict:
            parser.add_argument(f"--{field.name}", f"--{field.name.replace('_', '-')}", type=_mapping,
                                default=field.default_factory(), help=meta.get("help"))  # type: ignore[misc,operator]
            return
        TrlParser._parse_dataclass_field(parser, field)
        if field.default is not dataclasses.MISSING and field.default is not None:
            for action in parser._actions:  # HfArgumentParser drops a plain default of a `str | list[str]` field
                if action.dest == field.name and action.default is None:
                    action.default = field.default

    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit
        raise TrlVideoError(message)


def _pre_parser() -> argparse.ArgumentParser:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", "--config", dest="recipe")
    pre.add_argument("--set", action="append", default=[])
    return pre


def parse_train_args(argv: list[str], recipe: dict[str, Any] | None = None, where: str | None = None) -> TrainArgs:
    """Parse ``trl-video train`` arguments (or, with ``recipe``, a recipe mapping and optional flags)."""
    pre, _ = _pre_parser().parse_known_args(argv)
    if recipe is None:
        recipe = load_recipe(pre.recipe) if pre.recipe else {}
        where = where or (f"recipe {pre.recipe}" if pre.recipe else "command line")
    where = where or "recipe"
    data = apply_overrides(recipe, pre.set)
    clean = check_fields(VideoRewardConfig, data, where)
    parser = RecipeParser()
    unused = parser.set_defaults_with_config(**copy.deepcopy(clean))
    assert not unused, unused  # check_fields rejected unknown keys already
    try:
        config, extras, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                                  look_for_args_file=False)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", key=exc.key) from None
    except TrlVideoError as exc:  # argparse: a flag's value
        raise TrlVideoError(f"command line: {exc}") from None
    if rest:
        flag = rest[0].split("=")[0]
        known = [s for a in parser._actions for s in a.option_strings]
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TrlVideoError(f"unknown option '{flag}'{hint}")
    recorded = dict(clean)
    for f in dataclasses.fields(config):  # flags given on the command line
        value = getattr(config, f.name)
        base = clean[f.name] if f.name in clean else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)  # type: ignore[misc]
        if value != base:
            recorded[f.name] = value
    return TrainArgs(config=config, recipe=recorded, recipe_path=extras.recipe, resume=extras.resume,
                     dry_run=extras.dry_run, accept_recipe_changes=extras.accept_recipe_changes)
