"""SDXL's conditioning from the crop to the UNet: the data's original sizes and crop corners, and the training
step's two-encoder prompts and size micro-conditioning, checked against diffusers' own SDXL pipeline."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dreambooth import seeds
from dreambooth.data import DreamBoothData, Example, crop_top_left
from dreambooth.step import StepSettings, micro_batch_loss

SETTINGS = StepSettings(prior_loss_weight=0.5, offset_noise=0.0, offset_noise_levels=1, snr_gamma=None,
                        mask_background_weight=1.0)


# --- the data: original size and crop corner, read off the crop the pixels were cut with ---------------


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels: any two different crops or a mirrored one differ."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def cut(image: Image.Image, top: int, left: int, size: int = 32) -> torch.Tensor:
    pixels = np.array(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


def shown_at(pixels: torch.Tensor, resized: Image.Image, corner: tuple[int, int]) -> str:
    """Whether `pixels` are the square at `corner` of the resized image ("plain") or of its mirror image
    ("mirrored"): the crop conditioning must say where the pixels the model sees came from."""
    if torch.equal(pixels, cut(resized, *corner)):
        return "plain"
    assert torch.equal(pixels, cut(ImageOps.mirror(resized), *corner)), f"no square at {corner} shows these pixels"
    return "mirrored"


def test_size_conditioning_is_read_off_the_crop_the_pixels_were_cut_with():
    # 60x40 at resolution 32 becomes 48x32: the crop slides 0..16 across; the class photo 40x64 becomes 32x51.
    photo, cat = noise_image(60, 40), noise_image(40, 64, seed=1)
    data = DreamBoothData([Example(Path("a.png"), "a", photo)], [Example(Path("c.png"), "c", cat)], 32,
                          center_crop=False, random_flip=True, seed=0)
    resized_photo = photo.resize((48, 32), Image.Resampling.LANCZOS)
    resized_cat = cat.resize((32, 51), Image.Resampling.LANCZOS)
    seen = set()
    for k in range(24):
        batch = data.batch([k])
        assert batch["original_sizes"] == [(40, 60), (64, 40)]  # (height, width) as decoded, before the resize
        (top, left), (cat_top, cat_left) = batch["crop_top_lefts"]
        how = shown_at(batch["pixel_values"][0], resized_photo, (top, left))
        assert top == 0 and 0 <= left <= 16
        assert cat_left == 0 and 0 <= cat_top <= 19
        shown_at(batch["pixel_values"][1], resized_cat, (cat_top, cat_left))
        # The same draws as before (flip, top, left from the example's stream): no extra random number is taken.
        generator = seeds.generator(0, 1, k)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        drawn_top = int(torch.randint(0, 1, (1,), generator=generator))
        drawn_left = int(torch.randint(0, 17, (1,), generator=generator))
        assert how == ("mirrored" if flip else "plain")
        assert (top, left) == (drawn_top, 48 - drawn_left - 32 if flip else drawn_left)
        seen.add((how, left))
    assert {how for how, _ in seen} == {"plain", "mirrored"} and len({left for _, left in seen}) > 4


def test_center_crop_conditioning_is_the_middle_and_a_flip_mirrors_it():
    # 61x40 becomes 49x32: the centre square starts at 8 from the left, so 9 from the left of the mirror image.
    photo = noise_image(61, 40)
    data = DreamBoothData([Example(Path("a.png"), "a", photo)], None, 32, center_crop=True, random_flip=True, seed=0)
    resized = photo.resize((49, 32), Image.Resampling.LANCZOS)
    seen = {}
    for k in range(12):
        batch = data.batch([k])
        corner = batch["crop_top_lefts"][0]
        seen[shown_at(batch["pixel_values"][0], resized, corner)] = corner
    assert seen == {"plain": (0, 8), "mirrored": (0, 9)}
    tall = DreamBoothData([Example(Path("t.png"), "t", noise_image(40, 60))], None, 32, True, False, seed=0)
    assert tall.batch([0])["crop_top_lefts"] == [(8, 0)] and tall.batch([0])["original_sizes"] == [(60, 40)]


def test_crop_top_left_of_a_flipped_crop_is_its_left_edge_in_the_mirror_image():
    assert crop_top_left((48, 32), (5, 0, 37, 32), flip=False) == (0, 5)
    assert crop_top_left((48, 32), (5, 0, 37, 32), flip=True) == (0, 11)  # 48 - 37
    assert crop_top_left((32, 51), (0, 7, 32, 39), flip=True) == (7, 0)  # a square as wide as the image stays put


# --- the step ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_model):
    """diffusers' tiny SDXL pipeline and the parts the step reads, as `models.Components` holds them."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    models = SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, tokenizer_2=pipe.tokenizer_2,
                             text_encoder_2=pipe.text_encoder_2, vae=pipe.vae, unet=pipe.unet,
                             noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    return pipe, models


def sdxl_batch(crop: tuple[int, int] = (0, 8), original: tuple[int, int] = (40, 60)) -> dict:
    """One instance example and one class example, as DreamBoothData.batch lays them out."""
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"pixel_values": pixels, "prompts": ["a photo of miru cat", "a photo of a cat"], "num_instance": 1,
            "original_sizes": [original, (64, 40)], "crop_top_lefts": [crop, (9, 0)]}


def loss_of(models, batch: dict) -> torch.Tensor:
    return micro_batch_loss(batch, torch.Generator().manual_seed(3), models, SETTINGS).loss


def test_the_sdxl_loss_is_what_diffusers_sdxl_pipeline_conditions_its_unet_with(sdxl):
    pipe, models = sdxl
    batch = sdxl_batch()
    with torch.no_grad():
        loss = loss_of(models, batch)
        # By hand, with the same draws in the same order: latent sample, noise, timesteps.
        generator = torch.Generator().manual_seed(3)
        posterior = pipe.vae.encode(batch["pixel_values"]).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
        latents = latents * 0.13025  # the SDXL VAE's own scaling factor (SD 1.x's is 0.18215)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
        embeds, _, pooled, _ = pipe.encode_prompt(batch["prompts"], device="cpu", do_classifier_free_guidance=False)
        # The pipeline's own time ids, checked by it against the UNet's added-embedding width.
        time_ids = torch.cat([pipe._get_add_time_ids(size, corner, (32, 32), embeds.dtype, 32)
                              for size, corner in zip(batch["original_sizes"], batch["crop_top_lefts"])])
        prediction = pipe.unet(noisy, timesteps, embeds,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        per_example = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.isfinite(loss)
    assert torch.equal(loss, per_example[0] + 0.5 * per_example[1])


def test_gradients_reach_the_size_and_pooled_text_conditioning(sdxl):
    _, models = sdxl
    models.unet.zero_grad(set_to_none=True)
    models.text_encoder_2.zero_grad(set_to_none=True)
    loss_of(models, sdxl_batch()).backward()
    assert models.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0  # fed by time ids and pooled embedding
    assert models.text_encoder_2.text_projection.weight.grad.abs().sum() > 0  # the pooled embedding is used
    models.unet.zero_grad(set_to_none=True)
    models.text_encoder_2.zero_grad(set_to_none=True)


def test_the_crop_and_original_size_change_the_loss(sdxl):
    _, models = sdxl
    with torch.no_grad():
        base = loss_of(models, sdxl_batch())
        assert torch.equal(base, loss_of(models, sdxl_batch()))  # same draws, same conditioning: same loss
        assert not torch.equal(base, loss_of(models, sdxl_batch(crop=(0, 0))))
        assert not torch.equal(base, loss_of(models, sdxl_batch(original=(80, 120))))


def test_an_sdxl_batch_without_size_conditioning_is_refused(sdxl):
    _, models = sdxl
    batch = sdxl_batch()
    del batch["crop_top_lefts"]
    with pytest.raises(ValueError, match="original_sizes and crop_top_lefts"):
        loss_of(models, batch)


def test_a_batch_from_the_data_trains_sdxl(sdxl):
    _, models = sdxl
    data = DreamBoothData([Example(Path("a.png"), "a photo of miru cat", noise_image(60, 40))],
                          [Example(Path("c.png"), "a photo of a cat", noise_image(40, 64, seed=1))], 32,
                          center_crop=False, random_flip=True, seed=0)
    with torch.no_grad():
        assert torch.isfinite(loss_of(models, data.batch([0, 1])))
