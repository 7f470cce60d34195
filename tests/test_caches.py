"""The latent and prompt-embedding caches: what they return is what the encoders return, each distinct input
is encoded once, and training with them is training without them; latents on disk come back bit for bit, only
to the same VAE; offloaded encoders are never touched for what is cached, and come home for what is not."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from dreambooth.caches import CachedTextEncoder, CachedVAE, EncoderOffloaded, _key, fill_prompts
from dreambooth.encoding import encode_images, encode_prompts, encode_prompts_sdxl, tokenize
from dreambooth.models import load_components
from dreambooth.step import StepSettings, micro_batch_loss
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


# --- on disk ---------------------------------------------------------------------------------------------------


def test_latents_on_disk_are_read_back_bit_for_bit_by_the_next_run(tiny_model, tmp_path):
    vae = load_components(str(tiny_model)).vae
    pixels = images(3, seed=3)
    first = CachedVAE(vae, folder=tmp_path)
    stored = first.encode(pixels).latent_dist
    assert (first.disk_hits, first.misses) == (0, 3)
    files = list((tmp_path / first.fingerprint).iterdir())
    assert sorted(path.suffix for path in files) == [".safetensors"] * 3  # one per image, no temporary left
    second = CachedVAE(load_components(str(tiny_model)).vae, folder=tmp_path)  # the next run loads it again
    read = second.encode(pixels[[2, 0, 1]]).latent_dist
    assert second.fingerprint == first.fingerprint and (second.hits, second.disk_hits, second.misses) == (0, 3, 0)
    assert torch.equal(read.mean, stored.mean[[2, 0, 1]]) and torch.equal(read.std, stored.std[[2, 0, 1]])
    second.encode(pixels[:1])
    assert (second.hits, second.disk_hits) == (1, 3)  # from memory once read


def test_another_vae_or_dtype_or_tiling_never_reads_these_latents(tiny_model, tmp_path):
    pixels = images(2, seed=4)
    CachedVAE(load_components(str(tiny_model)).vae, folder=tmp_path).encode(pixels)
    changed = load_components(str(tiny_model)).vae
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3  # one weight of millions
    double = load_components(str(tiny_model)).vae.to(torch.float64)
    tiled = load_components(str(tiny_model)).vae
    tiled.enable_tiling()
    for other in (changed, double, tiled):
        cache = CachedVAE(other, folder=tmp_path)
        cache.fill(pixels)  # in the VAE's dtype, as the step casts them
        assert (cache.disk_hits, cache.misses) == (0, 2)
    assert len(list(tmp_path.iterdir())) == 4  # a subfolder per VAE


def test_a_corrupt_cache_file_is_a_miss_encoded_again_and_rewritten(tiny_model, tmp_path):
    vae = load_components(str(tiny_model)).vae
    pixels = images(3, seed=5)
    first = CachedVAE(vae, folder=tmp_path)
    stored = first.encode(pixels).latent_dist
    paths = [first.path(_key(image)) for image in pixels]
    paths[0].write_bytes(paths[0].read_bytes()[:200])  # cut short
    garbled = bytearray(paths[1].read_bytes())
    garbled[-1] ^= 1  # one bit of one number: still a valid file, refused by its digest
    paths[1].write_bytes(bytes(garbled))
    paths[2].write_bytes(b"not a safetensors file")
    second = CachedVAE(vae, folder=tmp_path)
    with pytest.warns(UserWarning, match="unreadable"):
        read = second.encode(pixels).latent_dist
    assert (second.disk_hits, second.misses) == (0, 3)
    assert torch.equal(read.mean, stored.mean) and torch.equal(read.std, stored.std)
    third = CachedVAE(vae, folder=tmp_path)
    third.encode(pixels)
    assert (third.disk_hits, third.misses) == (3, 0)  # the files were written again


def test_an_interrupted_or_impossible_write_leaves_no_file_and_the_run_goes_on(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch

    vae = load_components(str(tiny_model)).vae

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    cache = CachedVAE(vae, folder=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.encode(images(1, seed=6))
    assert list((tmp_path / cache.fingerprint).iterdir()) == []  # neither the entry nor its temporary file
    monkeypatch.undo()
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    cache = CachedVAE(vae, folder=not_a_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cache.encode(images(2, seed=6)).latent_dist
    assert len(caught) == 1 and "memory only" in str(caught[0].message)  # said once, not for every image
    assert cache.misses == 2 and torch.equal(got.mean, CachedVAE(vae).encode(images(2, seed=6)).latent_dist.mean)


# --- prefilled and offloaded -----------------------------------------------------------------------------------

SETTINGS = StepSettings(prior_loss_weight=0.5, offset_noise=0.0, offset_noise_levels=1, snr_gamma=None,
                        mask_background_weight=1.0)


def step_loss(models, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return micro_batch_loss(batch, torch.Generator().manual_seed(3), models, SETTINGS).loss


def test_filled_and_offloaded_to_meta_the_caches_answer_the_step_without_the_models(tiny_model):
    components = load_components(str(tiny_model))
    prompts = ["a photo of miru cat", "a photo of a cat"]
    batch = {"pixel_values": images(2, seed=7), "prompts": prompts, "num_instance": 1}
    plain = step_loss(components, batch)
    models = dataclasses.replace(components, vae=CachedVAE(components.vae),
                                 text_encoder=CachedTextEncoder(components.text_encoder))
    with pytest.raises(TypeError, match="CachedTextEncoder"):
        fill_prompts(components, prompts)  # nothing to fill behind a bare encoder
    models.vae.fill(batch["pixel_values"])
    fill_prompts(models, prompts + prompts[:1])
    before = step_loss(models, batch)
    models.vae.offload("meta")  # the weights are gone: anything that used them would fail
    models.text_encoder.offload("meta")
    assert components.vae.device.type == "meta" and models.vae.offloaded
    assert models.vae.device == torch.device("cpu")  # the step still sends its inputs home
    after = step_loss(models, batch)
    assert torch.equal(after, before)
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-6)  # uncached, the batch is encoded at once
    assert (models.vae.hits, models.vae.misses) == (4, 2) and (models.text_encoder.hits, models.text_encoder.misses) \
        == (4, 2)  # both steps' calls answered by the fill
    with pytest.raises(EncoderOffloaded, match="meta device"):
        models.vae.encode(images(1, seed=8))
    with pytest.raises(EncoderOffloaded, match="meta device"):
        encode_prompts(models.text_encoder, components.tokenizer, ["a new prompt"], "cpu")


def test_filled_prompts_are_every_call_the_sdxl_step_makes(tiny_sdxl_model):
    xl = load_components(str(tiny_sdxl_model))
    tokenizers = [xl.tokenizer, xl.tokenizer_2]
    prompts = ["a photo of miru cat", "a photo of a cat"]
    expected = encode_prompts_sdxl([xl.text_encoder, xl.text_encoder_2], tokenizers, prompts, "cpu")
    models = dataclasses.replace(xl, text_encoder=CachedTextEncoder(xl.text_encoder),
                                 text_encoder_2=CachedTextEncoder(xl.text_encoder_2))
    wrapped = [models.text_encoder, models.text_encoder_2]
    fill_prompts(models, prompts)
    for encoder in wrapped:
        encoder.offload("meta")
    got = encode_prompts_sdxl(wrapped, tokenizers, prompts, "cpu")
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert [(encoder.hits, encoder.misses) for encoder in wrapped] == [(2, 2), (2, 2)]


def test_the_fill_of_token_ids_is_keyed_like_the_call_it_stands_for(tiny_model):
    components = load_components(str(tiny_model))
    prompts = ["a photo of miru cat", "a photo of a cat"]
    cached = CachedTextEncoder(components.text_encoder)
    cached.fill(tokenize(components.tokenizer, prompts), output_hidden_states=True)  # SDXL's call, not SD's
    encode_prompts(cached, components.tokenizer, prompts, "cpu")
    assert (cached.hits, cached.misses) == (0, 4)
    cached.fill(tokenize(components.tokenizer, prompts))  # SD's call, output_hidden_states=False: now cached
    assert (cached.hits, cached.misses) == (2, 4)


@pytest.mark.parametrize("part", ["vae", "text_encoder"])
def test_a_miss_brings_an_offloaded_encoder_home_before_it_computes(tiny_model, monkeypatch, part):
    components = load_components(str(tiny_model))
    model = getattr(components, part)
    if part == "vae":
        cached, method = CachedVAE(model), "encode"

        def ask(seed):
            return cached.encode(images(1, seed=seed)).latent_dist.mean

        def truth(seed):
            return model.encode(images(1, seed=seed)).latent_dist.mean
    else:
        cached, method = CachedTextEncoder(model), "forward"

        def ask(seed):
            return encode_prompts(cached, components.tokenizer, [f"prompt {seed}"], "cpu")

        def truth(seed):
            return encode_prompts(model, components.tokenizer, [f"prompt {seed}"], "cpu")
    with torch.no_grad():
        expected = [truth(seed) for seed in (0, 1)]  # the model's own answers, before it is watched
    moves, computed_offloaded = [], []
    real_to, real_compute = model.to, getattr(model, method)

    def moving(*args, **kwargs):
        moves.append(torch.device(args[0]))
        return real_to(*args, **kwargs)

    def computing(*args, **kwargs):
        computed_offloaded.append(cached.offloaded)
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(model, "to", moving)
    monkeypatch.setattr(model, method, computing)
    ask(0)
    cached.offload("cpu:1")  # this machine's one other device: a CPU index, where tensors still say "cpu"
    assert cached.offloaded and moves == [torch.device("cpu:1")]
    assert torch.equal(ask(0), expected[0])  # a hit: no move, no computation
    assert moves == [torch.device("cpu:1")] and computed_offloaded == [False]
    assert torch.equal(ask(1), expected[1])  # a miss: home first, then computed there
    assert moves == [torch.device("cpu:1"), torch.device("cpu")] and computed_offloaded == [False, False]
    assert not cached.offloaded  # and it stays home
    cached.offload("cpu")
    cached.restore()  # validation brings it back explicitly
    assert not cached.offloaded and moves[-1] == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to offload from")
def test_an_offloaded_vae_computes_a_miss_on_its_gpu_again(tiny_model):
    vae = load_components(str(tiny_model)).vae.to("cuda")
    cached = CachedVAE(vae)
    generator = torch.Generator("cuda").manual_seed(0)
    hit = encode_images(cached, images(1, seed=0), generator)
    cached.offload("cpu")
    assert vae.device.type == "cpu" and cached.device.type == "cuda"
    assert torch.equal(encode_images(cached, images(1, seed=0), generator.manual_seed(0)), hit)
    miss = cached.encode(images(1, seed=1).cuda()).latent_dist.mean
    assert vae.device.type == "cuda" and torch.equal(miss, vae.encode(images(1, seed=1).cuda()).latent_dist.mean)
