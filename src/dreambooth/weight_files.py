"""Which weight files a diffusers pipeline folder holds, judged before from_pretrained reads any of them.

Two questions, both answered from file names: does a component load from a pickle (which can run code), and does
the folder have the weight variant asked for (`--variant fp16`: files named `*.fp16.safetensors`)? diffusers would
otherwise load the pickle silently, or fail with a message about missing .safetensors files that points the wrong way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dreambooth.errors import UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
WEIGHT_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
PICKLE_REFUSAL = ("holds pickled weights (no .safetensors beside it), and loading a pickle can run code from the "
                  "file; convert it to .safetensors, or pass --allow-pickle to load it (only if you trust its source)")
# Variant files as diffusers and transformers name them: "model.fp16.safetensors", sharded
# "diffusion_pytorch_model.fp16-00001-of-00002.safetensors" (and the index "...safetensors.index.fp16.json").
VARIANT_NAME = re.compile(r"^[^.]+\.(?P<variant>[\w]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin|ckpt|pt|pth)$")


def only_pickled_weights(folder: Path) -> Path | None:
    """The first pickled weights file in `folder` when it has no .safetensors, which from_pretrained prefers."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return None
    return next((path for path in sorted(folder.iterdir()) if path.suffix.lower() in PICKLE_SUFFIXES), None)


def components(folder: Path, skip=()) -> list[str]:
    """The component folders a pipeline folder's model_index.json lists, but those in `skip`."""
    index = json.loads((folder / "model_index.json").read_text())
    # Components are [library, class]; [null, null] marks one the pipeline was saved without.
    return [name for name, entry in index.items() if not name.startswith("_") and name not in skip
            and isinstance(entry, list) and entry and entry[0] is not None]


def check_pickled_components(folder: Path, model: str, skip=()) -> None:
    """Refuse a pipeline folder in which a component to load (all but `skip`) has only pickled weights."""
    for name in components(folder, skip):
        pickled = only_pickled_weights(folder / name)
        if pickled is not None:
            raise UserError(f"--model {model}: {pickled.relative_to(folder)} {PICKLE_REFUSAL}")


def weight_variants(folder: Path) -> tuple[list[Path], set[str]]:
    """A component folder's default (unnamed) weight files, and the variants it has."""
    if not folder.is_dir():
        return [], set()
    files = [path for path in sorted(folder.iterdir()) if path.suffix.lower() in WEIGHT_SUFFIXES]
    named = {path: match["variant"] for path in files if (match := VARIANT_NAME.match(path.name))}
    return [path for path in files if path not in named], set(named.values())


def check_variant(folder: Path, model: str, variant: str | None, skip=()) -> None:
    """Refuse `--variant` where no component has it (diffusers falls back to the default files per component, so
    one that has it is enough), and a folder of variant files only when no --variant names them."""
    found = {name: weight_variants(folder / name) for name in components(folder, skip)}
    weighted = {name: (default, variants) for name, (default, variants) in found.items() if default or variants}
    if variant is not None and weighted and not any(variant in variants for _, variants in weighted.values()):
        others = sorted(set().union(*(variants for _, variants in weighted.values())))
        has = f"it has {', '.join(others)}" if others else "it has only its default weights"
        raise UserError(f"--variant {variant}: {model} has no {variant} weights (no *.{variant}.safetensors; {has}); "
                        "leave --variant out to load its default weights")
    if variant is None:
        for name, (default, variants) in weighted.items():
            if not default and variants:
                raise UserError(f"--model {model}: {name}/ holds only {', '.join(sorted(variants))} weights; "
                                f"pass --variant {sorted(variants)[0]}")
