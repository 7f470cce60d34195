"""Which Stable Diffusion family a MODEL is, told from its files or its hub config before any weights load.

SD 1.x and 2.x share one code path ("sd"); SDXL ("sdxl") has two text encoders. A diffusers folder or hub id is
told apart by the pipeline class its model_index.json names, a .safetensors checkpoint by its keys (SDXL's second
text encoder; a pickled one is not opened), and anything else (SD 3, Flux, inpainting) is refused in one line naming
what can be trained; a --model-config of another family than its checkpoint is refused too. dreambooth.models asks
here while resolving a MODEL, and for the diffusers pipeline class that loads each family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from dreambooth.errors import UserError

Family = Literal["sd", "sdxl"]

# Pipelines whose UNet, VAE and text encoders this trainer knows (the img2img classes share the text-to-image
# parts). SD 3, Flux and the inpainting UNets (9 input channels) are different models.
TRAINABLE_PIPELINES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
}


def folder_family(folder: Path) -> Family:
    """The family of a diffusers pipeline folder, from the class its model_index.json names."""
    try:
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--model {folder}: model_index.json is unreadable ({error})") from error
    return _family_from_class_name(class_name, str(folder))


def _family_from_class_name(class_name: str, where: str) -> Family:
    if class_name in TRAINABLE_PIPELINES:
        return TRAINABLE_PIPELINES[class_name]
    raise UserError(f"--model {where}: a {class_name or 'unknown'} pipeline is not a model family dreambooth can "
                    "train; it trains Stable Diffusion 1.x, 2.x and SDXL")


def check_config_family(model_config: str, family: Family, model: str) -> None:
    """A single file read with the configs of another family loads garbage or fails deep inside diffusers."""
    from diffusers import DiffusionPipeline

    try:
        class_name = DiffusionPipeline.load_config(model_config).get("_class_name", "")
    except Exception as error:  # the hub client raises many types; all mean "could not read it"
        message = f"--model-config {model_config}: not a diffusers pipeline folder or hub id ({error})"
        raise UserError(message) from error
    config_family = _family_from_class_name(class_name, model_config)
    if config_family != family:
        names = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL"}
        raise UserError(f"--model-config {model_config}: describes an {names[config_family]} pipeline but "
                        f"{model} is an {names[family]} checkpoint; give the matching config")


def single_file_family(path: Path) -> Family:
    """SDXL checkpoints carry a second text encoder under `conditioner.embedders.1`."""
    if path.suffix.lower() != ".safetensors":
        return "sd"  # pickled files are not opened before loading; diffusers infers their layout
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise UserError(f"--model {path}: not a readable .safetensors file ({error})") from error
    return "sdxl" if any(key.startswith("conditioner.embedders.1") for key in keys) else "sd"


def hub_family(model_id: str, revision: str | None = None) -> Family:
    """The family of a hub model at `revision` (default: main), from its model_index.json (fetched, or read from
    the local cache).

    The hub client's own errors (offline, no such id, no network) pass through: the caller words them, as it
    does a failure to load the model itself."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model_id, revision=revision)
    return _family_from_class_name(config.get("_class_name", ""), model_id)


def pipeline_class_for(family: Family) -> type:
    """The diffusers pipeline class that loads a model of this family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
