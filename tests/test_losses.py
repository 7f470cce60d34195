"""The loss functions against hand computations."""

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.errors import UserError
from dreambooth.losses import dreambooth_loss, mask_pixel_weights, min_snr_weights, prediction_target, training_noise


def scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


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


def test_training_noise_pyramid_hides_the_coarse_signal_left_in_the_last_timestep():
    shape = (256, 4, 16, 16)
    plain = training_noise(shape, torch.Generator().manual_seed(0))
    coarse = training_noise(shape, torch.Generator().manual_seed(0), 0.3, offset_noise_levels=3)
    assert torch.equal(coarse, training_noise(shape, torch.Generator().manual_seed(0), 0.3, offset_noise_levels=3))
    # Channel means of plain noise vary by 1/16; with coarse noise by about 0.3, several times the ~0.07
    # of the image that SD's schedule leaves at t=999, so they no longer tell the model the scene.
    assert plain.mean(dim=(2, 3)).std() < 0.08 < 0.25 < coarse.mean(dim=(2, 3)).std()
    top, bottom = coarse[:, :, :8].mean(dim=(2, 3)), coarse[:, :, 8:].mean(dim=(2, 3))
    assert (top - bottom).std() > 1.4 * (plain[:, :, :8].mean(dim=(2, 3)) - plain[:, :, 8:].mean(dim=(2, 3))).std()


def test_one_level_of_offset_noise_is_constant_over_the_latent():
    shape = (8, 4, 16, 16)
    plain = training_noise(shape, torch.Generator().manual_seed(1))
    offset = training_noise(shape, torch.Generator().manual_seed(1), 0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand(shape), atol=1e-6)
    assert shift[:, :, 0, 0].abs().max() > 0.1


def test_pixel_weights_make_a_weighted_mean_that_ignores_zero_weight_pixels():
    target = torch.zeros(2, 4, 8, 8)
    prediction = torch.zeros(2, 4, 8, 8)
    prediction[:, :, :, 4:] = 3.0  # wrong only on the right half
    left = torch.zeros(2, 1, 8, 8)
    left[:, :, :, :4] = 1.0
    assert dreambooth_loss(prediction, target, 2, 1.0, pixel_weights=left).loss.item() == 0.0
    plain = dreambooth_loss(prediction, target, 1, 1.0)
    ones = dreambooth_loss(prediction, target, 1, 1.0, pixel_weights=torch.ones(2, 1, 8, 8))
    assert torch.allclose(plain.loss, ones.loss) and plain.loss.item() == pytest.approx(9.0)
    # Weight 1 on the right half, 0.1 on the wrong one: (0.1 * 9) / (1 + 0.1), whatever the half's size.
    faint = dreambooth_loss(prediction, target, 2, 1.0, pixel_weights=0.1 + 0.9 * left).loss.item()
    assert faint == pytest.approx(0.9 / 1.1, rel=1e-5)


def test_mask_pixel_weights_follow_the_mask_on_the_latent_grid():
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :, :16] = 1.0
    masks[1, :, :, 16:18] = 1.0  # half of latent column 4 (pixels 16-19) on the second example
    grid = mask_pixel_weights(masks, torch.Size([8, 8]), background_weight=0.2)
    assert grid.shape == (2, 1, 8, 8)
    assert torch.all(grid[:, :, :, :4] == 1.0) and torch.allclose(grid[0, :, :, 4:], torch.full((1, 8, 4), 0.2))
    assert torch.allclose(grid[1, :, :, 4], torch.full((1, 8), 0.2 + 0.8 * 0.5))
