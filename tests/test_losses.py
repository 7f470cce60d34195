"""The loss functions against hand computations."""

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.errors import UserError
from dreambooth.losses import dreambooth_loss, min_snr_weights, prediction_target


def scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def test_prior_preservation_loss_is_instance_mse_plus_weighted_class_mse():
    torch.manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    parts = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.7)
    # Two separate MSEs, computed without the per-example route the function takes.
    instance_mse = torch.nn.functional.mse_loss(prediction[:2], target[:2])
    class_mse = torch.nn.functional.mse_loss(prediction[2:], target[2:])
    assert torch.allclose(parts.instance_loss, instance_mse)
    assert torch.allclose(parts.prior_loss, class_mse)
    assert torch.allclose(parts.loss, instance_mse + 0.7 * class_mse)


def test_without_class_examples_the_loss_is_the_plain_mse():
    prediction, target = torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    parts = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=1.0)
    assert parts.prior_loss is None
    assert parts.loss.item() == pytest.approx(1.0)


def test_example_weights_scale_each_example():
    prediction, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    parts = dreambooth_loss(prediction, target, 1, 1.0, example_weights=torch.tensor([0.5, 2.0]))
    assert parts.instance_loss.item() == pytest.approx(0.5)
    assert parts.prior_loss.item() == pytest.approx(2.0)


def test_epsilon_target_is_the_noise():
    latents, noise, timesteps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert torch.equal(prediction_target(scheduler("epsilon"), latents, noise, timesteps), noise)


def test_v_prediction_target_is_the_velocity():
    sched = scheduler("v_prediction")
    latents, noise, timesteps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    alpha_bar = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(prediction_target(sched, latents, noise, timesteps), expected, atol=1e-6)


def test_sample_prediction_is_refused():
    with pytest.raises(UserError, match="sample"):
        prediction_target(scheduler("sample"), torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_min_snr_weights_clip_high_snr_steps():
    sched = scheduler("epsilon")
    timesteps = torch.tensor([1, 500, 999])
    snr = sched.alphas_cumprod[timesteps] / (1 - sched.alphas_cumprod[timesteps])
    weights = min_snr_weights(sched, timesteps, gamma=5.0)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 1.0 and weights[2] == pytest.approx(1.0)
    v_weights = min_snr_weights(scheduler("v_prediction"), timesteps, gamma=5.0)
    assert torch.allclose(v_weights, torch.clamp(snr, max=5.0) / (snr + 1))
