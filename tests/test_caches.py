"""The latent and prompt-embedding caches: what they return is what the encoders return, each distinct input
is encoded once, and training with them is training without them."""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth.caches import CachedTextEncoder, CachedVAE
from dreambooth.encoding import encode_prompts, encode_prompts_sdxl, tokenize
from dreambooth.models import load_components
from dreambooth.train import train

from conftest import TINY_RESOLUTION
from test_train import make_config


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_cached_latent_distribution_is_the_vaes_and_each_image_is_encoded_once(tiny_model):
    vae = load_components(str(tiny_model)).vae
    pixels = images(3)
    cached = CachedVAE(vae)
    first = cached.encode(pixels).latent_dist
    for index, image in enumerate(pixels):  # each image encoded alone: a pure function of its pixels
        alone = vae.encode(image[None]).latent_dist
        assert torch.equal(first.mean[index], alone.mean[0]) and torch.equal(first.std[index], alone.std[0])
    batch = vae.encode(pixels).latent_dist  # the uncached step encodes the batch: the same up to rounding
    torch.testing.assert_close(first.mean, batch.mean, rtol=1e-5, atol=1e-6)
    again = cached.encode(pixels[[2, 0]]).latent_dist
    assert torch.equal(again.mean, first.mean[[2, 0]]) and (cached.hits, cached.misses) == (2, 3)
    changed = pixels[:1].clone()
    changed[0, 0, 0, 0] += 0.01  # one pixel differs: another image
    cached.encode(changed)
    assert cached.misses == 4
    assert cached.config is vae.config and cached.dtype == vae.dtype  # everything else is the VAE's


def test_the_latent_cache_forgets_the_least_recently_used_beyond_its_bound(tiny_model):
    vae = load_components(str(tiny_model)).vae
    pixels = images(3, seed=1)
    one_entry = 2 * 4 * (TINY_RESOLUTION // 2) ** 2 * 4  # mean and std, fp32, 4 x 16 x 16
    cached = CachedVAE(vae, max_bytes=2 * one_entry)
    cached.encode(pixels[:2])
    cached.encode(pixels[:1])  # image 0 is now the most recently used
    cached.encode(pixels[2:])  # image 2 pushes out image 1
    assert cached.bytes == 2 * one_entry and len(cached.entries) == 2
    cached.encode(pixels[:1])
    assert cached.misses == 3  # image 0 was kept
    cached.encode(pixels[1:2])
    assert cached.misses == 4  # image 1 was forgotten


def test_cached_prompt_embeddings_are_the_text_encoders(tiny_model, tiny_sdxl_model):
    components = load_components(str(tiny_model))
    prompts = ["a photo of miru cat", "a photo of a cat", "a photo of miru cat"]
    cached = CachedTextEncoder(components.text_encoder)
    fresh = encode_prompts(components.text_encoder, components.tokenizer, prompts, "cpu")
    torch.testing.assert_close(encode_prompts(cached, components.tokenizer, prompts, "cpu"), fresh, rtol=1e-5,
                               atol=1e-6)
    assert (cached.hits, cached.misses) == (1, 2)
    alone = components.text_encoder(tokenize(components.tokenizer, prompts[:1]))[0]
    assert torch.equal(encode_prompts(cached, components.tokenizer, prompts[:1], "cpu"), alone)
    xl = load_components(str(tiny_sdxl_model))
    encoders = [xl.text_encoder, xl.text_encoder_2]
    wrapped = [CachedTextEncoder(encoder) for encoder in encoders]
    expected = encode_prompts_sdxl(encoders, [xl.tokenizer, xl.tokenizer_2], prompts, "cpu")
    for _ in range(2):  # filling the cache, then from it
        got = encode_prompts_sdxl(wrapped, [xl.tokenizer, xl.tokenizer_2], prompts, "cpu")
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert wrapped[1].hits == 4 and wrapped[1].misses == 2


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_training_with_the_caches_is_training_without_them(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                           train_text_encoder):
    import dreambooth.caches as caches

    encodes = []
    real_encode = CachedVAE.encode

    def counting(self, pixels):
        output = real_encode(self, pixels)
        encodes.append(self.misses)
        return output

    monkeypatch.setattr(caches.CachedVAE, "encode", counting)
    runs = {}
    for cache in (True, False):
        config = make_config(tiny_model, instance_dir, tmp_path / f"cache-{cache}", max_train_steps=4,
                             train_batch_size=2, center_crop=True, cache=cache, train_text_encoder=train_text_encoder)
        path = train(config)
        runs[cache] = [json.loads(line) for line in path.metrics.read_text().splitlines()]
    for cached, plain in zip(runs[True], runs[False]):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert encodes[-1] == 3  # 8 images shown over 4 steps, 3 distinct crops (centre, no flip): 3 encodes


def test_every_image_is_listed_only_when_each_has_one_crop(tmp_path):
    import numpy as np
    from PIL import Image

    from dreambooth.data import DreamBoothData, load_examples, to_tensor

    from conftest import write_images

    write_images(tmp_path / "square", 2, size=TINY_RESOLUTION + 8)  # square: one crop once resized
    (tmp_path / "wide").mkdir()
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 256, (TINY_RESOLUTION, TINY_RESOLUTION + 12, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "wide" / f"wide{index}.png")
    square = load_examples(tmp_path / "square", "p", "--instance-dir")
    wide = load_examples(tmp_path / "wide", "p", "--instance-dir")
    flipped = list(DreamBoothData(square, None, TINY_RESOLUTION, False, True, 0).every_image())
    assert len(flipped) == 4 and torch.equal(flipped[1], flipped[0].flip(-1))  # both flips of each photo
    assert DreamBoothData(wide, None, TINY_RESOLUTION, False, False, 0).every_image() is None  # 13 crops each
    centred = list(DreamBoothData(wide, square, TINY_RESOLUTION, True, False, 0).every_image())
    expected = to_tensor(wide[0].image, TINY_RESOLUTION, center_crop=True, flip=False, generator=None)
    assert len(centred) == 4 and torch.equal(centred[0], expected)
