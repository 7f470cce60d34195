"""Short names for models that live somewhere on disk: `--model NAME` and `--clip-model` / `--dino-model NAME`.

The core knows no names of its own. A package names its models by registering them, either directly
(`register_model_alias`) or through a Python entry point in the group `dreambooth.aliases` whose target
is called with no arguments the first time any name is looked up. That is how the miniature world
makes `miniworld` mean its shipped weights without the core ever importing it.

Kept free of torch imports: the CLI and config resolve names before any model is loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal

from dreambooth.errors import UserError

ENTRY_POINT_GROUP = "dreambooth.aliases"

AliasKind = Literal["model", "embedding"]
# The file whose presence says the folder holds the weights: diffusers pipelines and transformers models.
MARKER_FILES: dict[AliasKind, str] = {"model": "model_index.json", "embedding": "config.json"}


@dataclass(frozen=True)
class Alias:
    """A name and how to find its folder; the folder is asked for at lookup time, not at registration."""

    name: str
    kind: AliasKind
    folder: Callable[[], Path]
    description: str = ""


_ALIASES: dict[tuple[AliasKind, str], Alias] = {}
_plugins_loaded = False


def register_model_alias(name: str, folder: Callable[[], Path], description: str = "") -> None:
    """Make `--model NAME` mean the diffusers pipeline folder that `folder()` returns."""
    _register(Alias(name, "model", folder, description))


def register_embedding_alias(name: str, folder: Callable[[], Path], description: str = "") -> None:
    """Make `--clip-model NAME` / `--dino-model NAME` mean the transformers model folder `folder()` returns."""
    _register(Alias(name, "embedding", folder, description))


def model_alias_folder(name: str, flag: str = "--model") -> Path | None:
    """The pipeline folder `name` stands for, None if it names no model; a UserError if its weights are missing."""
    return _installed_folder("model", name, flag)


def embedding_alias_folder(name: str, flag: str = "--clip-model") -> Path | None:
    """The model folder `name` stands for, None if it names no embedding model; a UserError if it is missing."""
    return _installed_folder("embedding", name, flag)


def _register(alias: Alias) -> None:
    if not alias.name or "/" in alias.name or alias.name != alias.name.strip():
        # A slash would shadow hub ids (owner/name); surrounding spaces would never match a flag's value.
        raise ValueError(f"alias {alias.name!r}: a name is one word without '/' or surrounding spaces")
    # Plugins first, so a direct registration made before the first lookup is not overwritten by one.
    _load_plugins()
    _ALIASES[(alias.kind, alias.name)] = alias


def _installed_folder(kind: AliasKind, name: str, flag: str) -> Path | None:
    _load_plugins()
    alias = _ALIASES.get((kind, name))
    if alias is None:
        return None
    folder = Path(alias.folder())
    marker = MARKER_FILES[kind]
    if not (folder / marker).is_file():
        what = f" ({alias.description})" if alias.description else ""
        raise UserError(f"{flag} {name}{what}: its weights are not installed (no {marker} in {folder})")
    return folder


def _load_plugins() -> None:
    """Call every `dreambooth.aliases` entry point, once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # set first: a plugin's own register_* calls come back through here
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()()
        except Exception as error:  # a broken plugin must not stop names that do not need it
            warnings.warn(f"dreambooth: the alias plugin {entry_point.name!r} ({entry_point.value}) failed to load: "
                          f"{error}", stacklevel=2)
