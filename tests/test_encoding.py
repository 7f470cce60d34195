"""Encoding: latents from the VAE's distribution, prompts to token ids, and the identifier's tokens (the full
text-encoder path is exercised by the training tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from conftest import write_tiny_tokenizer
from dreambooth.encoding import encode_images, identifier_token_ids, tokenize
from dreambooth.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def ids(tokenizer, text: str) -> set[int]:
    return set(tokenizer(text, add_special_tokens=False).input_ids)


def test_the_identifier_is_what_the_instance_prompt_has_and_the_class_prompt_lacks(tokenizer):
    found = identifier_token_ids(tokenizer, "a photo of miru cat", "a photo of a cat", None)
    assert set(found) == ids(tokenizer, "miru") and not set(found) & ids(tokenizer, "a photo of cat")


def test_a_named_identifier_wins(tokenizer):
    assert set(identifier_token_ids(tokenizer, "a photo of miru cat", None, "miru")) == ids(tokenizer, "miru")


def test_no_identifier_to_find_is_named(tokenizer):
    with pytest.raises(UserError, match="--identifier"):
        identifier_token_ids(tokenizer, "a photo of a cat", "a photo of a cat", None)
    with pytest.raises(UserError, match="--identifier WORD"):
        identifier_token_ids(tokenizer, "a photo of miru cat", None, None)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_latents_are_drawn_from_the_vae_distribution_then_shifted_and_scaled(tiny_model, shift):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    vae.register_to_config(shift_factor=shift)  # SD 1.x/2.x have none; SD3 and Flux VAEs shift their latents
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = encode_images(vae, pixels, torch.Generator().manual_seed(4))
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    draw = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(4))
    expected = (posterior.mean + posterior.std * draw - (shift or 0.0)) * vae.config.scaling_factor
    assert torch.allclose(latents, expected, atol=1e-6)


def test_prompts_are_padded_and_cut_to_the_text_encoders_length(tokenizer):
    short, long = tokenize(tokenizer, ["a cat", "cat " * 200])
    assert short.shape == long.shape == (77,)
    assert long[0] == tokenizer.bos_token_id and long[-1] == tokenizer.eos_token_id  # cut, with its ends kept
