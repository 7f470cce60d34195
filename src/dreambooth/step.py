"""The loss of one micro-batch, as one pure function: encode -> noise -> timesteps -> predict -> target ->
weights -> loss.

No Accelerator, optimizer or run folder lives here: the same function serves `train` (which adds
gradient accumulation, clipping and the optimizer step around it) and the miniature world's pretraining,
and a test can call it on a tiny model and compare it with a computation by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dreambooth.config import TrainConfig
from dreambooth.encoding import encode_images, encode_prompts, encode_prompts_sdxl, size_time_ids
from dreambooth.losses import (LossParts, dreambooth_loss, mask_pixel_weights, min_snr_weights, prediction_target,
                               training_noise)


class StepModels(Protocol):
    """What the loss needs of a pipeline's parts (`models.Components` has them). SDXL is told apart by its
    second text encoder; an object without `text_encoder_2` counts as SD 1.x/2.x."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # a DDPMScheduler: it adds the noise and knows the prediction type
    tokenizer_2: Any  # SDXL only, else None
    text_encoder_2: torch.nn.Module | None  # SDXL only, else None


@dataclass(frozen=True)
class StepSettings:
    """Every setting the loss of one micro-batch depends on (no defaults: each caller says what it trains)."""

    prior_loss_weight: float  # weight of the class examples' term (used when the batch has some)
    offset_noise: float
    offset_noise_levels: int
    snr_gamma: float | None  # Min-SNR-gamma weighting; None weighs every timestep alike
    mask_background_weight: float  # loss weight outside the subject, for batches that carry masks


def step_settings(config: TrainConfig) -> StepSettings:
    """The loss settings of a training run."""
    return StepSettings(
        prior_loss_weight=config.prior_loss_weight,
        offset_noise=config.offset_noise,
        offset_noise_levels=config.offset_noise_levels,
        snr_gamma=config.snr_gamma,
        mask_background_weight=config.mask_background_weight,
    )


def micro_batch_loss(batch: dict[str, Any], generator: torch.Generator, models: StepModels, settings: StepSettings,
                     device: torch.device | str = "cpu",
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> LossParts:
    """The DreamBooth loss of one batch from `data.DreamBoothData.batch` (pixel_values, prompts, num_instance,
    optionally masks; SDXL also reads original_sizes and crop_top_lefts). Every random number comes from
    `generator`, in this order: the VAE's latent sample, the noise, the timesteps; so the same generator
    state gives the same loss."""
    scheduler = models.noise_scheduler
    # 1. Encode: a latent drawn from the frozen VAE's distribution.
    with torch.no_grad():
        latents = encode_images(models.vae, batch["pixel_values"], generator).float()
    # 2. Noise and timesteps.
    noise = training_noise(latents.shape, generator, settings.offset_noise, settings.offset_noise_levels)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    latents, noise, timesteps = (tensor.to(device) for tensor in (latents, noise, timesteps))
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    # 3. Predict, conditioned on the prompts (a frozen text encoder records no graph; a trained one learns).
    if getattr(models, "text_encoder_2", None) is None:
        hidden_states = encode_prompts(models.text_encoder, models.tokenizer, batch["prompts"], device)
        with autocast():
            prediction = models.unet(noisy_latents, timesteps, hidden_states).sample
    else:
        hidden_states, added = sdxl_conditioning(batch, models, device)
        with autocast():
            prediction = models.unet(noisy_latents, timesteps, hidden_states, added_cond_kwargs=added).sample
    # 4. What the prediction should have been, and how much each example and pixel counts.
    target = prediction_target(scheduler, latents, noise, timesteps)
    example_weights = min_snr_weights(scheduler, timesteps, settings.snr_gamma) if settings.snr_gamma else None
    pixel_weights = None
    if "masks" in batch:
        pixel_weights = mask_pixel_weights(batch["masks"], latents.shape[-2:], settings.mask_background_weight)
    return dreambooth_loss(prediction, target, batch["num_instance"], settings.prior_loss_weight, example_weights,
                           pixel_weights=pixel_weights)


def sdxl_conditioning(batch: dict[str, Any], models: StepModels,
                      device: torch.device | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDXL's UNet inputs besides the latents: both encoders' hidden states, and the pooled embedding with the
    size micro-conditioning ("text_embeds", "time_ids") that its added embedding reads."""
    if "original_sizes" not in batch or "crop_top_lefts" not in batch:
        # No silent default: a made-up size would teach the model a size the images never had.
        raise ValueError("an SDXL batch needs original_sizes and crop_top_lefts (data.DreamBoothData.batch gives them)")
    hidden_states, pooled = encode_prompts_sdxl([models.text_encoder, models.text_encoder_2],
                                                [models.tokenizer, models.tokenizer_2], batch["prompts"], device)
    resolution = batch["pixel_values"].shape[-1]
    time_ids = size_time_ids(batch["original_sizes"], batch["crop_top_lefts"], resolution).to(device)
    return hidden_states, {"text_embeds": pooled, "time_ids": time_ids}
