"""The frozen encoders' work: pixels to latents (VAE) and prompts to embeddings (text encoder).

Training and class-image code call only these two functions, so caching latents or prompt
embeddings, or adding SDXL's second encoder and size conditioning, changes this file alone.
"""

from __future__ import annotations

import torch


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
