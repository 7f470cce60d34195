"""Encoding: latents from the VAE's distribution, prompts to token ids, the identifier's tokens, SDXL's two-encoder
prompt embeddings and size conditioning (the SD text-encoder path is exercised by the training tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from conftest import write_tiny_tokenizer
from dreambooth import encoding
from dreambooth.encoding import (encode_images, encode_prompts_sdxl, identifier_token_ids, size_time_ids, tokenize,
                                 warn_long_prompts)
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


@pytest.fixture
def fresh_memory(monkeypatch) -> None:
    """Forget which prompts this process has measured, so each test sees its own warnings."""
    monkeypatch.setattr(encoding, "_MEASURED_PROMPTS", set())


def test_a_prompt_over_the_text_encoders_length_is_named_once_with_its_count_and_lost_words(
        tokenizer, fresh_memory, capsys):
    fits, too_long = "a " * 74 + "b", "a " * 75 + "z"  # 77 tokens with the start and end tokens; 78
    warn_long_prompts(tokenizer, [fits, too_long, too_long], "--instance-prompt")
    for _ in range(3):  # what the step does without a cache, every step
        tokenize(tokenizer, [too_long, fits])
    warn_long_prompts(tokenizer, [too_long], "--validation-prompt")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"--instance-prompt: '{'a ' * 28}a...' is 78 tokens; the text encoder reads the first 77, "
                     "so 'z' is ignored"]


def test_only_the_first_process_of_a_multi_gpu_run_names_a_long_prompt(tokenizer, fresh_memory, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("RANK", "1")
    warn_long_prompts(tokenizer, ["cat " * 100], "--instance-prompt")
    assert capsys.readouterr().err == ""


def test_tokenize_names_a_long_prompt_nobody_measured_before(tokenizer, fresh_memory, capsys):
    tokenize(tokenizer, ["cat " * 100, "cat " * 100])
    tokenize(tokenizer, ["cat " * 100])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("prompt: 'cat cat") and "is 102 tokens; the text encoder reads the first 77" in line


class Wrapped(torch.nn.Module):
    """What accelerate's DistributedDataParallel does to a trained encoder: the model moves to .module and
    only calling the wrapper is allowed (its config, hidden states and projection are not attributes here)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.fixture(scope="module")
def sdxl_pipeline(tiny_sdxl_model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)


def test_sdxl_prompts_are_encoded_exactly_as_the_sdxl_pipeline_does(sdxl_pipeline):
    pipe = sdxl_pipeline
    prompts = ["a photo of miru cat", "a photo of a cat on a very long and winding road " * 6]
    hidden_states, pooled = encode_prompts_sdxl([pipe.text_encoder, pipe.text_encoder_2],
                                                [pipe.tokenizer, pipe.tokenizer_2], prompts, "cpu")
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert hidden_states.shape == (2, 77, 64) and pooled.shape == (2, 32)  # two 32-wide encoders side by side
    assert torch.equal(hidden_states, expected)  # bit-identical: the same modules on the same token ids
    assert torch.equal(pooled, expected_pooled)
    # Penultimate layers, not the last: SDXL skips each encoder's final layer (and its final layer norm).
    with torch.no_grad():
        last = pipe.text_encoder(tokenize(pipe.tokenizer, prompts)).last_hidden_state
    assert not torch.allclose(hidden_states[..., :32], last)


def test_sdxl_encoding_only_calls_the_encoders_so_wrapped_ones_work(sdxl_pipeline):
    pipe = sdxl_pipeline
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    plain = encode_prompts_sdxl(encoders, tokenizers, ["a cat"], "cpu")
    wrapped = encode_prompts_sdxl([Wrapped(e) for e in encoders], tokenizers, ["a cat"], "cpu")
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped))


def test_size_time_ids_are_original_size_crop_corner_and_target_per_example():
    time_ids = size_time_ids([(40, 60), (1024, 768)], [(0, 9), (128, 0)], 32)
    assert time_ids.dtype == torch.float32  # diffusers hands the UNet a float tensor
    assert time_ids.tolist() == [[40, 60, 0, 9, 32, 32], [1024, 768, 128, 0, 32, 32]]
    assert size_time_ids([], [], 32).shape == (0, 6)
    with pytest.raises(ValueError, match="2 original sizes but 1 crop"):
        size_time_ids([(40, 60), (40, 60)], [(0, 0)], 32)


def test_caches_take_their_inputs_on_the_cpu_and_models_on_the_step_device(tiny_model):
    """A cache keys inputs by their values: handed GPU tensors it would read them back every step."""
    from diffusers import AutoencoderKL

    from dreambooth.caches import CachedTextEncoder, CachedVAE
    from dreambooth.encoding import input_device

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    assert input_device(vae, "cuda") == "cuda"
    assert input_device(CachedVAE(vae), "cuda") == "cpu"
    assert input_device(CachedTextEncoder(torch.nn.Linear(1, 1)), "cuda") == "cpu"
