"""Pure loss functions: the prediction target, the DreamBooth loss and Min-SNR weights."""

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


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
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


def dreambooth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float,
    example_weights: torch.Tensor | None = None,
) -> LossParts:
    """MSE on the instance examples + prior_loss_weight * MSE on the class examples that follow them.

    Batches hold instance examples first, then (with prior preservation) as many class examples.
    """
    per_example = ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)
    if example_weights is not None:
        per_example = per_example * example_weights.to(per_example)
    instance_loss = per_example[:num_instance].mean()
    if per_example.shape[0] == num_instance:
        return LossParts(instance_loss, instance_loss, None)
    prior_loss = per_example[num_instance:].mean()
    return LossParts(instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss)
