"""Pure functions of the training objective: the noise, the prediction target, the DreamBooth loss, mask
weights and Min-SNR weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreambooth.errors import UserError


@dataclass
class LossParts:
    """The total loss and the two terms it is made of (prior is None without prior preservation)."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None


def training_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, offset_noise: float = 0.0,
                   offset_noise_levels: int = 1) -> torch.Tensor:
    """Gaussian noise plus offset noise (Guttenberg 2023): `offset_noise` times noise that is constant over
    the whole latent, and with more levels also half as much constant over its halves, a quarter over its
    quarters, and so on (a coarse pyramid).

    Why the pyramid: Stable Diffusion's schedule keeps about 7% of the image at the last timestep. On small
    latents (the miniature world's are 16x16) the channel means and coarse layout of that leak are as
    strong as those of the noise itself, so a model trained on plain noise reads the scene off the noise
    and ignores the prompt. Coarse noise makes the leak uninformative; sampling still starts from plain
    Gaussian noise. One level is the classic offset noise, which lets a model shift a whole image's
    brightness (very dark or bright subjects)."""
    noise = torch.randn(shape, generator=generator)
    if not offset_noise:
        return noise
    for level in range(offset_noise_levels):
        cells = 2**level
        coarse = torch.randn((*shape[:2], cells, cells), generator=generator)
        upsampled = torch.nn.functional.interpolate(coarse, size=tuple(shape[2:]), mode="nearest")
        noise = noise + offset_noise / cells * upsampled
    return noise


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models, SD 1.x) or the velocity (v models, SD 2.x 768)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"the model's scheduler predicts '{prediction_type}'; only epsilon and v_prediction can be trained")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example Min-SNR-gamma weights (Hang et al. 2023), normalised for the model's prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)  # a v target already carries a factor of (snr + 1)
    return clipped / snr


def mask_pixel_weights(masks: torch.Tensor, latent_size: tuple[int, int] | torch.Size,
                       background_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights from masks [B, 1, H, W] in [0, 1]: 1 on the subject, `background_weight`
    elsewhere; a latent pixel the mask covers in part gets the share of its area in between."""
    coverage = torch.nn.functional.interpolate(masks, size=tuple(latent_size), mode="area")
    return background_weight + (1.0 - background_weight) * coverage


def dreambooth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float,
    example_weights: torch.Tensor | None = None,
    pixel_weights: torch.Tensor | None = None,
) -> LossParts:
    """MSE on the instance examples + prior_loss_weight * MSE on the class examples that follow them.

    Batches hold instance examples first, then (with prior preservation) as many class examples.
    `pixel_weights` [B, 1, H, W] (masked training) makes each example's MSE a weighted mean over its
    pixels, so a small subject is not learned more slowly than a large one.
    """
    squared_error = (prediction.float() - target.float()) ** 2
    if pixel_weights is None:
        per_example = squared_error.flatten(1).mean(dim=1)
    else:
        weights = pixel_weights.to(squared_error).expand_as(squared_error)
        per_example = (squared_error * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1e-8)
    if example_weights is not None:
        per_example = per_example * example_weights.to(per_example)
    instance_loss = per_example[:num_instance].mean()
    if per_example.shape[0] == num_instance:
        return LossParts(instance_loss, instance_loss, None)
    prior_loss = per_example[num_instance:].mean()
    return LossParts(instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss)
