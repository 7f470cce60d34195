"""The frozen encoders' work: pixels to latents (VAE) and prompts to embeddings (text encoder).

Training and class-image code call only these two functions, so caching latents or prompt
embeddings, or adding SDXL's second encoder and size conditioning, changes this file alone.
"""

from __future__ import annotations

import torch

from dreambooth.errors import UserError


def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample latents for images in [-1, 1], scaled the way the UNet was trained (the VAE config says how)."""
    distribution = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    # Draw on the generator's device so a seeded run gives the same latents on any accelerator.
    noise = torch.randn(distribution.mean.shape, generator=generator, device=generator.device if generator else "cpu")
    latents = distribution.mean + distribution.std * noise.to(distribution.mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as Stable Diffusion was trained."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(text_encoder, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The per-token hidden states the UNet cross-attends to (the encoder may be wrapped for multi-GPU)."""
    token_ids = tokenize(tokenizer, prompts).to(device)
    return text_encoder(token_ids)[0]


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
