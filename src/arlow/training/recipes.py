"""Recipes and the command plumbing shared by every training stage (``arlow pretrain``, ``align``, ``sft``).

A recipe is a YAML tree of sections (``model``, ``data``, ``train``, ...), shipped in ``arlow/configs/<stage>/`` or
given as a file, with dotted ``key=value`` overrides applied on top (:func:`arlow.training.config.apply_overrides`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

import yaml

from .config import apply_overrides, check_keys, load_yaml
from .distributed import rank_and_world

__all__ = ["recipe_path", "load_recipe", "run_recipe_command"]


def recipe_path(name: str, stage: str) -> Path:
    """A user's YAML file, or the name of a recipe shipped in ``arlow/configs/<stage>/``."""
    if Path(name).is_file():
        return Path(name)
    shipped = Path(str(resources.files("arlow") / "configs" / stage / f"{name}.yaml"))
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped.parent.glob("*.yaml"))
    raise ValueError(f"no recipe {name!r}: give a YAML file or one of the shipped recipes {names}")


def load_recipe(stage: str, config: str, overrides: list[str] | None,
                sections: Mapping[str, set[str] | None]) -> dict:
    """The recipe tree of ``config`` (:func:`recipe_path`) after ``overrides``. Sections other than those of
    ``sections`` are refused, and so are keys outside a section's key set (``None``: not checked here)."""
    tree = load_yaml(recipe_path(config, stage))
    if overrides:
        tree = apply_overrides(tree, overrides)
    unknown = set(tree) - set(sections)
    if unknown:
        raise ValueError(f"unknown recipe sections {sorted(unknown)}; expected {sorted(sections)}")
    for section, keys in sections.items():
        if keys is not None:
            check_keys(section, tree.get(section) or {}, sorted(keys))
    return tree


def run_recipe_command(args: argparse.Namespace, load: Callable[[str | None, list[str]], dict],
                       train: Callable[[dict], dict], closing: Callable[[dict, dict], str]) -> int:
    """``arlow <stage> [--config C] [--resume R] [--print-config] [key=value ...]``: load the recipe, print it or
    train it, then print the summary and the line ``closing(tree, summary)`` (if any) on rank 0 only."""
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    tree = load(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(tree, sort_keys=False))
        return 0
    summary = train(tree)
    if rank_and_world()[0] == 0:
        print(json.dumps(summary, indent=2, default=str))
        if line := closing(tree, summary):
            print(line)
    return 0
