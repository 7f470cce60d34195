"""How much GPU memory a training run needs, before renting a GPU (`dreambooth train ... --estimate-memory`).

The models are built from their configs alone, on the meta device (`accelerate.init_empty_weights`), and
frozen / given adapters the way `dreambooth.train.prepare_models` does; so the parameter counts are exact and
an SD 1.5 or SDXL estimate reads a few kB of JSON, no weights. What is counted: weights (trained and frozen,
by dtype), gradients, optimizer state and cached latents. Activations are not: they depend on the kernels
(attention implementation), batch size, resolution and gradient checkpointing, and are best measured.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth import lora
from dreambooth.config import TrainConfig
from dreambooth.errors import UserError
from dreambooth.models import ModelSource, native_resolution, resolve_model

GIB = 2**30  # GPU memory is sold and reported (nvidia-smi, torch.cuda) in binary units
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
WEIGHT_DTYPE = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_BYTES = 4 * 2  # a cached latent is its distribution's mean and std, both fp32

# Optimizer state: bytes per trained parameter (AdamW 8: two fp32 moments), or bytes of one trained
# parameter tensor given its shape (for optimizers whose state is not proportional, e.g. 8-bit AdamW keeps
# small tensors in 32 bit, Adafactor factors its moments by rows and columns).
OptimizerState = float | Callable[[torch.Size], float]


@dataclass
class MemoryEstimate:
    """Bytes a training run holds on the GPU, not counting activations (see `not_counted`)."""

    parameters: dict[str, int]  # each model's own parameter count (unet, vae, text encoders), adapters excluded
    trained_parameters: int  # what the optimizer updates: whole models, or adapters (+ token embeddings)
    frozen_parameters: int
    trained_weights: dict[str, int]  # bytes by dtype name ("float32"); trained weights are always fp32
    frozen_weights: dict[str, int]  # bytes by dtype name: the mixed-precision dtype, or float32 without it
    gradients: int  # one fp32 gradient per trained parameter
    optimizer_state: int
    cached_latents: int
    cached_images: int
    resolution: int
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    notes: list[str] = field(default_factory=list)  # assumptions made, e.g. the architecture of a bare file

    @property
    def weights(self) -> int:
        return sum(self.trained_weights.values()) + sum(self.frozen_weights.values())

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.cached_latents

    def not_counted(self) -> list[str]:
        """What the total leaves out (the activations are usually the largest part), and what checkpointing does."""
        autocast = ""
        if self.mixed_precision != "no":
            # Autocast keeps a half copy of each fp32 weight it casts, until the backward pass has used it.
            copies = self.trained_parameters * 2 / GIB
            autocast = f" autocast's half copies of trained weights (up to {copies:.2f} GiB),"
        checkpointing = ("Gradient checkpointing is on: only each block's inputs are kept and the rest is recomputed "
                         "in the backward pass, a fraction of the activations for about a third more compute."
                         if self.gradient_checkpointing else
                         "Gradient checkpointing is off: every layer's activations are kept for the backward pass; "
                         "--gradient-checkpointing keeps a fraction of them for about a third more compute.")
        return [f"Not counted: activations (they grow with batch size x resolution^2),{autocast} the VAE's and "
                "text encoders' forward passes, the CUDA context (~0.3-0.5 GiB) and PyTorch's allocator cache.",
                checkpointing]

    def lines(self) -> list[str]:
        rows = [("weights, trained " + dtype, size) for dtype, size in self.trained_weights.items()]
        rows += [("weights, frozen " + dtype, size) for dtype, size in self.frozen_weights.items()]
        rows += [("gradients float32", self.gradients), ("optimizer state", self.optimizer_state)]
        if self.cached_images:
            rows.append((f"cached latents ({self.cached_images} images)", self.cached_latents))
        models = ", ".join(f"{name} {_count(count)}" for name, count in self.parameters.items())
        lines = [f"Memory estimate at {self.resolution} px, mixed precision {self.mixed_precision}",
                 f"  parameters: {models}; trained {_count(self.trained_parameters)}"]
        lines += [f"  {label:<34}{size / GIB:>8.2f} GiB" for label, size in rows]
        lines += [f"  {'total':<34}{self.total / GIB:>8.2f} GiB", *self.notes, *self.not_counted()]
        return lines

    def format(self) -> str:
        return "\n".join(self.lines())


def estimate_memory(model: ModelSource | str | Path, *, lora_rank: int | None = None, lora_alpha: float | None = None,
                    lora_targets: str | None = None, train_text_encoder: bool = False,
                    token_embeddings_trained: bool = False, mixed_precision: str = "no",
                    optimizer_state_bytes_per_param: OptimizerState = 8.0, cached_images: int = 0,
                    resolution: int | None = None, gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Estimate the memory of training `model` (a ModelSource, or a diffusers folder or hub id of which only
    the configs are read) with these settings; `cached_images` latents are cached (0: no cache)."""
    if mixed_precision not in WEIGHT_DTYPE:
        raise UserError(f"--mixed-precision {mixed_precision}: choose one of {', '.join(WEIGHT_DTYPE)}")
    with _config_location(model) as (where, notes):
        models = empty_models(where)
    trained = mark_trained(models, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                           train_text_encoder=train_text_encoder, token_embeddings_trained=token_embeddings_trained)
    frozen = [p for p in _unique_parameters(models) if not p.requires_grad]
    weight_dtype = WEIGHT_DTYPE[mixed_precision]
    # prepare_models keeps whatever learns in fp32 (autocast computes in half) and stores the rest in half.
    trained_bytes = sum(p.numel() for p in trained) * 4
    frozen_bytes = sum(p.numel() for p in frozen) * weight_dtype.itemsize
    if callable(optimizer_state_bytes_per_param):
        optimizer = sum(optimizer_state_bytes_per_param(p.shape) for p in trained)
    else:
        optimizer = optimizer_state_bytes_per_param * sum(p.numel() for p in trained)
    vae = models["vae"].config
    factor = 2 ** (len(vae.block_out_channels) - 1)  # the VAE halves the image once per block but the last
    resolution = resolution or int(models["unet"].config.sample_size) * factor
    latent = vae.latent_channels * (resolution // factor) ** 2 * LATENT_BYTES
    return MemoryEstimate(
        parameters={name: sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)
                    for name, m in models.items()},
        trained_parameters=sum(p.numel() for p in trained),
        frozen_parameters=sum(p.numel() for p in frozen),
        trained_weights={"float32": trained_bytes} if trained_bytes else {},
        frozen_weights={_dtype_name(weight_dtype): frozen_bytes},
        gradients=trained_bytes,
        optimizer_state=round(optimizer),
        cached_latents=cached_images * latent,
        cached_images=cached_images,
        resolution=resolution,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        notes=notes,
    )


def estimate_for_config(config: TrainConfig, source: ModelSource | None = None, *,
                        optimizer_state_bytes_per_param: OptimizerState = 8.0,
                        cached_images: int = 0) -> MemoryEstimate:
    """`estimate_memory` with a run's settings (the caller knows whether latents are cached, and how many)."""
    source = source or resolve_model(config.model, config.allow_pickle, config.model_config)
    return estimate_memory(
        source, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_targets=config.lora_targets,
        train_text_encoder=config.train_text_encoder,
        token_embeddings_trained=bool(config.token_embedding_learning_rate), mixed_precision=config.mixed_precision,
        optimizer_state_bytes_per_param=optimizer_state_bytes_per_param, cached_images=cached_images,
        resolution=config.resolution or native_resolution(source),
        gradient_checkpointing=config.gradient_checkpointing)


def estimate_run(config: TrainConfig) -> MemoryEstimate:
    """What `dreambooth train --estimate-memory` prints: the run's settings, its instance images and (with
    prior preservation) class images counted as cached latents unless --no-cache."""
    from dreambooth.data import list_images

    images = 0
    if config.cache:
        images = len(list_images(config.instance_dir, "--instance-dir"))
        images += config.num_class_images if config.with_prior_preservation else 0
    return estimate_for_config(config, cached_images=images)


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
    return [p for p in _unique_parameters(models) if p.requires_grad]


def _unique_parameters(models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in models.values():
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


@contextmanager
def _config_location(model: ModelSource | str | Path) -> Iterator[tuple[str, list[str]]]:
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"
