"""A pipeline's models built from their configs alone, on the meta device (`accelerate.init_empty_weights`):
the UNet, VAE and text encoders, frozen and given adapters as `dreambooth.prepare.prepare_models` does
(`mark_trained`), with its dtypes and modes (`prepare_like_training`). No weights are read and no memory is
taken, yet every parameter count and shape is exact: what the memory estimate (`dreambooth.memory`) counts and
the activation trace (`dreambooth.activations`) runs through. A bare single file is built from its family's
reference configs, SD 1.5's or SDXL base's published ones (`write_reference_configs`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dreambooth import lora
from dreambooth.activations import TEXT_ENCODERS, WEIGHT_DTYPE
from dreambooth.errors import UserError
from dreambooth.models import ModelSource

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def empty_models(where: str) -> dict[str, torch.nn.Module]:
    """The pipeline's UNet, VAE and text encoders built from their configs, with meta tensors (no memory)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    try:
        index = diffusers.DiffusionPipeline.load_config(where)
        models: dict[str, torch.nn.Module] = {}
        with init_empty_weights():
            for name in PARTS:
                library, class_name = index.get(name) or (None, None)
                if class_name is None:  # SD has no text_encoder_2; the SDXL refiner has no text_encoder
                    continue
                if library == "diffusers":
                    cls = getattr(diffusers, class_name)
                    models[name] = cls.from_config(cls.load_config(where, subfolder=name))
                else:
                    cls = getattr(transformers, class_name)
                    models[name] = cls(transformers.AutoConfig.from_pretrained(where, subfolder=name))
    except (OSError, ValueError, AttributeError, TypeError) as error:  # missing, malformed, unknown class
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"memory estimate: cannot read the model's configs in {where} ({first_line})") from error
    return models


def mark_trained(models: dict[str, torch.nn.Module], *, lora_rank: int | None, lora_alpha: float | None,
                 lora_targets: str | None, train_text_encoder: bool,
                 token_embeddings_trained: bool) -> list[torch.nn.Parameter]:
    """Freeze and add adapters as `prepare_models` / `add_lora` do; return the parameters that learn."""
    from accelerate import init_empty_weights

    names = ["unet"] + [name for name in TEXT_ENCODERS if name in models and train_text_encoder]
    for name, module in models.items():
        module.requires_grad_(name in names and lora_rank is None)
        if name not in names or lora_rank is None:
            continue
        part = "unet" if name == "unet" else "text_encoder"
        with init_empty_weights():  # the adapters land on the meta device too
            lora.add_adapters(module, part, lora_rank, lora_alpha or float(lora_rank), 0.0,
                              lora_targets or "attention", seed=0)
        if part == "text_encoder" and token_embeddings_trained:
            module.get_input_embeddings().weight.requires_grad_(True)  # the whole table learns (and has state)
    return [p for p in unique_parameters(models) if p.requires_grad]


def unique_parameters(models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in models.values():
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


@contextmanager
def config_location(model: ModelSource | str | Path) -> Iterator[tuple[str, list[str]]]:
    """Where the configs are: the folder or hub id itself, a single file's --model-config, or (for a bare
    single file) the family's reference configs written to a temporary folder; with notes on assumptions."""
    if not isinstance(model, ModelSource):
        yield str(model), []
    elif model.kind != "single_file":
        yield model.location, []
    elif model.model_config:
        yield model.model_config, []
    else:
        name = "sdxl" if model.family == "sdxl" else "sd15"
        label = "SDXL base" if name == "sdxl" else "SD 1.5 (an SD 2.x file differs)"
        with tempfile.TemporaryDirectory(prefix="dreambooth-configs-") as folder:
            yield str(write_reference_configs(folder, name)), [
                f"Architecture assumed: {label}; --model-config names the file's own configs."]


def prepare_like_training(models: dict[str, torch.nn.Module], trained: list[str], mixed_precision: str,
                          gradient_checkpointing: bool) -> None:
    """Give models marked by `mark_trained` the dtypes and modes `prepare_models` gives them: what learns in
    fp32, the rest in the mixed-precision dtype; trained models in training mode, checkpointed if asked."""
    from dreambooth.prepare import enable_gradient_checkpointing

    for name, module in models.items():
        for parameter in module.parameters():
            parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else
                                               WEIGHT_DTYPE[mixed_precision])
        module.train(name in trained)
        if name in trained and gradient_checkpointing:
            enable_gradient_checkpointing(module)


# The published configs of SD 1.5 and SDXL base (parameter-relevant fields; the rest are diffusers' defaults).
_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, max_position_embeddings=77,
               bos_token_id=0, eos_token_id=2, pad_token_id=1)
_CLIP_BIG_G = dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)
REFERENCE_CONFIGS: dict[str, dict[str, tuple[str, str, dict]]] = {
    "sd15": {
        "unet": ("diffusers", "UNet2DConditionModel", dict(
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=64, in_channels=4, out_channels=4,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)),
        "vae": ("diffusers", "AutoencoderKL", dict(_VAE, sample_size=512, scaling_factor=0.18215)),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L),
    },
    "sdxl": {
        "unet": ("diffusers", "UNet2DConditionModel", dict(
            block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
            cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True, sample_size=128,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            in_channels=4, out_channels=4, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
            up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"])),
        "vae": ("diffusers", "AutoencoderKL", dict(_VAE, sample_size=1024, scaling_factor=0.13025)),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", _CLIP_BIG_G),
    },
}
_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def write_reference_configs(folder: str | Path, name: str) -> Path:
    """Write SD 1.5's ("sd15") or SDXL base's ("sdxl") configs as a diffusers folder without weights (enough
    for `resolve_model`, `native_resolution` and `estimate_memory`, not for loading a pipeline)."""
    from transformers import CLIPTextConfig

    folder = Path(folder)
    if name not in REFERENCE_CONFIGS:
        raise UserError(f"reference configs {name}: choose one of {', '.join(REFERENCE_CONFIGS)}")
    index: dict[str, object] = {"_class_name": _PIPELINES[name], "_diffusers_version": "0.42.1"}
    for part, (library, class_name, values) in REFERENCE_CONFIGS[name].items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        index[part] = [library, class_name]
        if library == "diffusers":
            config = {"_class_name": class_name, "_diffusers_version": "0.42.1", **values}
            (folder / part / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        else:
            CLIPTextConfig(**values, architectures=[class_name]).save_pretrained(folder / part)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
