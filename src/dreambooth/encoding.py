"""The frozen encoders' work: pixels to latents (VAE), prompts to embeddings (text encoders), and SDXL's
size conditioning.

Training and class-image code call only these functions, so caching latents or prompt embeddings
changes this file alone.
"""

from __future__ import annotations

import os
import sys

import torch

from dreambooth.errors import UserError


def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample latents for images in [-1, 1], scaled the way the UNet was trained (the VAE config says how)."""
    distribution = vae.encode(pixel_values.to(device=input_device(vae, vae.device), dtype=vae.dtype)).latent_dist
    # Draw on the generator's device so a seeded run gives the same latents on any accelerator.
    noise = torch.randn(distribution.mean.shape, generator=generator, device=generator.device if generator else "cpu")
    latents = distribution.mean + distribution.std * noise.to(distribution.mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def input_device(model, device: torch.device | str) -> torch.device | str:
    """Where `model` takes its inputs: a cache (caches.py) keys them by their values on the CPU, and reading
    them back from a GPU would make every step wait for it; a model takes them on `device`."""
    return "cpu" if getattr(model, "keys_inputs_on_cpu", False) else device


# (text encoder length, prompt) pairs already measured by warn_long_prompts: the step tokenizes every batch when
# nothing is cached, and a prompt is measured (and a long one named) once per process, not once per step.
_MEASURED_PROMPTS: set[tuple[int, str]] = set()


def warn_long_prompts(tokenizer, prompts: list[str], flag: str) -> None:
    """One line on stderr for each prompt longer than the text encoder reads (tokenize cuts the rest off silently),
    naming `flag` (or the caption file) and the words lost; each prompt is measured once per process."""
    if os.environ.get("RANK", "0") != "0":
        return  # the processes of a multi-GPU run (torchrun sets RANK) see the same prompts; the first says so
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        if (limit, prompt) in _MEASURED_PROMPTS:
            continue
        _MEASURED_PROMPTS.add((limit, prompt))
        # Counted as tokenize counts: with the start and end tokens, which take two of the `limit` places.
        # verbose=False: transformers would warn "longer than the specified maximum" in its own words.
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        if len(ids) <= limit:
            continue
        lost = tokenizer.decode(ids[limit - 1:-1]).strip()
        print(f"{flag}: '{_shortened(prompt)}' is {len(ids)} tokens; the text encoder reads the first {limit}, so "
              f"'{_shortened(lost)}' is ignored", file=sys.stderr)


def _shortened(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[:length - 3].rstrip() + "..."


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as Stable Diffusion was trained (longer prompts are cut,
    and named once by warn_long_prompts: "prompt" here, the flag when the trainer has measured them first)."""
    warn_long_prompts(tokenizer, prompts, "prompt")
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(text_encoder, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The per-token hidden states the UNet cross-attends to (the encoder may be wrapped for multi-GPU)."""
    token_ids = tokenize(tokenizer, prompts).to(input_device(text_encoder, device))
    return text_encoder(token_ids)[0]


def encode_prompts_sdxl(text_encoders: list, tokenizers: list, prompts: list[str],
                        device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning, as it was trained and as `StableDiffusionXLPipeline.encode_prompt` computes it:
    every encoder's penultimate hidden states side by side on the last axis [B, 77, sum of widths], and the
    last encoder's projected pooled embedding [B, projection_dim] (the UNet's "text_embeds")."""
    hidden_states = []
    for text_encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        # Call the module itself (not its submodules) so an accelerate/DDP wrapper still syncs gradients.
        outputs = text_encoder(tokenize(tokenizer, prompts).to(input_device(text_encoder, device)),
                               output_hidden_states=True)
        # SDXL reads the penultimate layer, before the final layer norm, for every encoder.
        hidden_states.append(outputs.hidden_states[-2])
    # Only the last encoder (SDXL's OpenCLIP bigG, a CLIPTextModelWithProjection) projects its pooled state.
    return torch.cat(hidden_states, dim=-1), outputs.text_embeds


def size_time_ids(original_sizes: list[tuple[int, int]], crop_top_lefts: list[tuple[int, int]],
                  resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per example: (original height, original width, crop top, crop left,
    target height, target width): float32 [B, 6], a float tensor as diffusers gives the UNet (which embeds
    the numbers with sinusoids computed in float32, so they stay exact integers)."""
    if len(original_sizes) != len(crop_top_lefts):
        raise ValueError(f"{len(original_sizes)} original sizes but {len(crop_top_lefts)} crop corners")
    rows = [(*size, *corner, resolution, resolution) for size, corner in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 6)


def identifier_token_ids(tokenizer, instance_prompt: str, class_prompt: str | None,
                         identifier: str | None) -> list[int]:
    """The token ids of the word that names the subject: `identifier` if given, else every token of the
    instance prompt that the class prompt lacks ("miru" in "a photo of miru cat" vs "a photo of a cat")."""
    if identifier:
        ids = set(tokenizer(identifier, add_special_tokens=False).input_ids)
    elif class_prompt:
        ids = set(tokenizer(instance_prompt, add_special_tokens=False).input_ids)
        ids -= set(tokenizer(class_prompt, add_special_tokens=False).input_ids)
    else:
        raise UserError("--token-embedding-learning-rate needs --identifier WORD (the word that names the subject) "
                        "or a --class-prompt to find it by")
    if not ids:
        raise UserError(f"--instance-prompt {instance_prompt!r}: no word in it that --class-prompt lacks; name the "
                        "subject's word with --identifier")
    return sorted(ids)
