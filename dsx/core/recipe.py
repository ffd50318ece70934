"""Recipes: the plain-data (dict / YAML / JSON) form of a chain of transforms, as the CLI and config files hold it.

``from_recipe`` builds a ``Compose`` from a recipe and ``to_recipe`` writes one back, so the two round-trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from dsx.core.compose import Compose
from dsx.core.transform import Transform

Recipe = list[Any] | dict[str, Any] | str | os.PathLike


def _load_text(recipe: str | os.PathLike) -> Any:
    """Parse a recipe file (``.yaml`` / ``.yml`` / ``.json``) or a YAML / JSON string."""
    path = Path(recipe)
    if isinstance(recipe, os.PathLike) or ("\n" not in recipe and path.suffix.lower() in (".yaml", ".yml", ".json")):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        text, is_json = path.read_text(), path.suffix.lower() == ".json"
    else:
        text, is_json = recipe, False
    try:
        # PyYAML reads JSON's "1e-3" as a string, so JSON text goes to the JSON parser first.
        return json.loads(text)
    except json.JSONDecodeError as e:
        if is_json:
            raise ValueError(f"recipe {recipe}: invalid JSON: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {recipe!r}: invalid YAML: {e}") from e


def _steps(recipe: Recipe) -> list[Any]:
    data = _load_text(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe
    if isinstance(data, dict):
        if set(data) != {"transforms"}:
            raise ValueError(f"recipe: a dict recipe must be {{'transforms': [...]}}, got keys {sorted(data)}")
        data = data["transforms"]
    if not isinstance(data, list):
        raise ValueError(
            f"recipe: expected a list of steps, {{'transforms': [...]}}, a .yaml/.yml/.json file or such a "
            f"YAML/JSON string, got {type(data).__name__}: {data!r:.80}"
        )
    return data


def _build(i: int, step: Any) -> Transform:
    """One step: ``"name"``, ``{"name": {config}}`` or ``{"transform": "name", **config}``."""
    if isinstance(step, str):
        name, config = step, {}
    elif isinstance(step, dict) and "transform" in step:
        name, config = step["transform"], {k: v for k, v in step.items() if k != "transform"}
    elif isinstance(step, dict) and len(step) == 1:
        (name, config), = step.items()
        config = {} if config is None else config
    else:
        raise ValueError(f"recipe step {i}: expected 'name', {{'name': {{config}}}} or "
                         f"{{'transform': 'name', ...}}, got {step!r}")
    if name not in Transform.registry:
        raise ValueError(f"recipe step {i}: unknown transform {name!r}; valid names are {sorted(Transform.registry)}")
    cls = Transform.registry[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("inplace", "verify", "replay")]
    fields.append("verify")
    if not isinstance(config, dict):
        raise ValueError(f"recipe step {i} ({name}): settings must be a mapping of fields, got {config!r}")
    if unknown := sorted(set(config) - set(fields)):
        raise ValueError(f"recipe step {i} ({name}): unknown settings {unknown}; its fields are {fields}")
    try:
        return Transform.from_config(name, config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe step {i} ({name}): {e}; its fields are {fields}") from e


def from_recipe(recipe: Recipe) -> Compose:
    """Build the chain a recipe describes: a list of steps, ``{"transforms": [...]}``, a file path or YAML/JSON text.

    A step is a bare name (``"fuse"``), ``{"name": {field: value}}`` or ``{"transform": "name", field: value}``.
    """
    return Compose(tuple(_build(i, step) for i, step in enumerate(_steps(recipe))))


def to_recipe(transforms: Compose | Transform | Iterable[Transform]) -> dict[str, Any]:
    """The recipe dict (``{"transforms": [{"name": {config}}, ...]}``) that ``from_recipe`` turns back into them."""
    if isinstance(transforms, Compose):
        transforms = transforms.transforms
    elif isinstance(transforms, Transform):
        transforms = (transforms,)
    steps = []
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform) or Transform.registry.get(t.name) is not type(t):
            raise ValueError(f"to_recipe: item {i} ({type(t).__name__}) is not a registered dsx Transform")
        steps.append({t.name: {**t.config(), **({} if t.verify else {"verify": False})}})
    return {"transforms": steps}
