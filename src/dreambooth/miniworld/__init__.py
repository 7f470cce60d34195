"""The miniature world: a procedural renderer, miru the subject, and the shipped pretrained weights.

`base_model_path()` is a diffusers folder (`StableDiffusionPipeline.from_pretrained` loads it offline);
`world_clip_path()` is a transformers CLIPModel + CLIPTokenizer folder that judges images of the world.
`register_aliases` (the package's `dreambooth.aliases` entry point) names both `miniworld` for the core.
Kept free of torch imports so that importing the paths is cheap.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
ALIAS = "miniworld"  # as --model it names the shipped pipeline; as --clip-model / --dino-model the world-CLIP


def base_model_path() -> Path:
    """The miniature Stable Diffusion (64x64 images, 16x16x4 latents), shipped in the package."""
    return WEIGHTS / "pipeline"


def world_clip_path() -> Path:
    """The world-CLIP, trained contrastively on the world including markings such as miru's."""
    return WEIGHTS / "world-clip"


def weights_available() -> bool:
    """True once pretraining has been run and its weights copied into the package."""
    return (base_model_path() / "model_index.json").exists() and (world_clip_path() / "config.json").exists()


def register_aliases() -> None:
    """`--model miniworld` names the miniature Stable Diffusion; `--clip-model` / `--dino-model miniworld`
    the world-CLIP (the package's `dreambooth.aliases` entry point)."""
    from dreambooth.aliases import register_embedding_alias, register_model_alias

    register_model_alias(ALIAS, base_model_path, "the miniature Stable Diffusion shipped with the package")
    register_embedding_alias(ALIAS, world_clip_path, "the world-CLIP shipped with the package")
