"""Recipes: small TOML or JSON files (kept in indexes/) that say how to build an index.

Keys: store, index, scales, factory, memory_budget, candidate_stride, classes, gpu, seed. Paths are taken
relative to the current directory, like command-line arguments; ``index`` defaults to the recipe's
file name without extension (a bare name, so the index lands in indexes/<name>).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError

RECIPE_KEYS = ("store", "index", "scales", "factory", "memory_budget", "candidate_stride", "classes", "gpu", "seed")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe; unknown keys are an error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(path, f"cannot read the recipe: {err}") from err
    try:
        if path.suffix == ".json":
            recipe = json.loads(text)
        else:
            import tomllib  # Python >= 3.11

            recipe = tomllib.loads(text)
    except ImportError as err:
        raise InputError(path, "TOML recipes need Python >= 3.11; write the recipe as .json") from err
    except ValueError as err:
        raise InputError(path, f"not a valid recipe: {err}") from err
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise InputError(path, f"unknown recipe keys {unknown}; known: {list(RECIPE_KEYS)}")
    recipe.setdefault("index", path.stem)
    if isinstance(recipe.get("scales"), (str, int)):
        recipe["scales"] = [recipe["scales"]]
    return recipe
