"""The first training step written out by hand, from the papers' formulas: an independent computation that
tests/test_train_settings.py compares the trainer with.

It shares only the documented random-draw contract with the package (which seed each draw comes from,
`seeds.mix`; the order of the draws), not its code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.config import TrainConfig
from dreambooth.seeds import mix

from conftest import TINY_RESOLUTION

R = TINY_RESOLUTION
NOISE_STREAM = 4  # the step's stream in seeds.mix (train.NOISE_STREAM); data uses streams 0-3




def hand_pixels(path: Path, sample_id: int, stream: int, config: TrainConfig, grey: bool = False) -> torch.Tensor:
    """The documented augmentation: short side resized to the resolution (Lanczos), then with a generator
    seeded mix(seed, stream, sample id): a flip draw (always made), then the crop's top and left."""
    image = Image.open(path).convert("L" if grey else "RGB")
    width, height = image.size
    scale = R / min(width, height)
    if min(width, height) != R:
        image = image.resize((max(R, round(width * scale)), max(R, round(height * scale))), Image.Resampling.LANCZOS)
    width, height = image.size
    generator = torch.Generator().manual_seed(mix(config.seed, stream, sample_id))
    flip = bool(torch.rand((), generator=generator) < 0.5) and config.random_flip
    if config.center_crop:
        top, left = (height - R) // 2, (width - R) // 2
    else:
        top = int(torch.randint(0, height - R + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - R + 1, (1,), generator=generator))
    pixels = torch.from_numpy(np.array(image.crop((left, top, left + R, top + R)), dtype=np.float32))
    pixels = pixels.unsqueeze(0) if grey else pixels.permute(2, 0, 1)
    return pixels.flip(-1) if flip else pixels


def hand_pick(sample_id: int, count: int, stream: int, seed: int) -> int:
    """Sample id k takes item perm[k mod n] of the permutation drawn for epoch k // n."""
    epoch, position = divmod(sample_id, count)
    return int(torch.randperm(count, generator=torch.Generator().manual_seed(mix(seed, stream, epoch)))[position])


def hand_batch(config: TrainConfig, sample_ids: list[int]) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    photos = sorted(Path(config.instance_dir).glob("*.png"))
    pixels, prompts, masks = [], [], []
    for k in sample_ids:
        photo = photos[hand_pick(k, len(photos), 0, config.seed)]
        pixels.append(hand_pixels(photo, k, 1, config) / 127.5 - 1)
        prompts.append(config.instance_prompt)
        if config.instance_mask_dir:
            masks.append(hand_pixels(Path(config.instance_mask_dir) / photo.name, k, 1, config, grey=True) / 255)
    if config.class_prompt:
        cats = sorted(Path(config.class_dir).glob("*.png"))[: config.num_class_images]
        for k in sample_ids:
            pixels.append(hand_pixels(cats[hand_pick(k, len(cats), 2, config.seed)], k, 3, config) / 127.5 - 1)
            prompts.append(config.class_prompt)
            masks += [torch.ones(1, R, R)] if config.instance_mask_dir else []
    return torch.stack(pixels), prompts, torch.stack(masks) if masks else None


@dataclass
class HandStep:
    loss: float
    instance_loss: float
    prior_loss: float | None
    grads: dict[str, dict[str, torch.Tensor]]  # component -> parameter name -> gradient of the step's loss
    base: dict[str, dict[str, torch.Tensor]]  # component -> parameter name -> value before the step
    pixels: torch.Tensor  # the first micro-batch's images
    identifier_rows: list[int]


def hand_first_step(model: Path, config: TrainConfig) -> HandStep:
    """Step 1's loss and gradients with freshly loaded models, written out from the papers' formulas."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    alphas_cumprod = DDPMScheduler.from_pretrained(model / "scheduler").alphas_cumprod
    v_prediction = DDPMScheduler.from_pretrained(model / "scheduler").config.prediction_type == "v_prediction"
    text_encoder.requires_grad_(config.train_text_encoder)
    identifier_rows = sorted(set(tokenizer("miru", add_special_tokens=False).input_ids))

    micro_losses, instance_terms, prior_terms, first_pixels = [], [], [], None
    for micro_step in range(config.gradient_accumulation_steps):
        ids = [micro_step * config.train_batch_size + i for i in range(config.train_batch_size)]
        pixels, prompts, masks = hand_batch(config, ids)
        first_pixels = pixels if first_pixels is None else first_pixels
        generator = torch.Generator().manual_seed(mix(config.seed, NOISE_STREAM, 1, micro_step, 0))
        # Encode: x0 = (mean + std * z) * scaling_factor.
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            x0 = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
            x0 = x0 * vae.config.scaling_factor
        batch, channels, height, width = x0.shape
        # Noise: Gaussian, plus offset noise constant over the latent, then its halves, quarters...
        noise = torch.randn(x0.shape, generator=generator)
        for level in range(config.offset_noise_levels if config.offset_noise else 0):
            cells = 2**level
            coarse = torch.randn(batch, channels, cells, cells, generator=generator)
            blocks = coarse.repeat_interleave(height // cells, dim=2).repeat_interleave(width // cells, dim=3)
            noise = noise + config.offset_noise / cells * blocks
        t = torch.randint(0, 1000, (batch,), generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        # Predict from the prompts' hidden states.
        tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        prediction = unet(noisy, t, text_encoder(tokens.input_ids)[0]).sample
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0 if v_prediction else noise
        squared = (prediction - target) ** 2
        if masks is not None:  # each latent pixel weighs in with the mask's share of its 2x2 pixels
            background = config.mask_background_weight
            weight = (background + (1 - background) * torch.nn.functional.avg_pool2d(masks, 2)).expand_as(squared)
            per_example = (squared * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))
        else:
            per_example = squared.mean(dim=(1, 2, 3))
        if config.snr_gamma:  # Min-SNR: min(snr, gamma) / snr, or / (snr + 1) for a v target
            snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
            per_example = per_example * torch.clamp(snr, max=config.snr_gamma) / (snr + 1 if v_prediction else snr)
        instance = per_example[: config.train_batch_size].mean()
        prior = per_example[config.train_batch_size :].mean() if config.class_prompt else None
        micro_losses.append(instance + config.prior_loss_weight * prior if prior is not None else instance)
        instance_terms.append(instance.item())
        prior_terms += [prior.item()] if prior is not None else []
    loss = torch.stack(micro_losses).mean()
    loss.backward()
    components = {"unet": unet} | ({"text_encoder": text_encoder} if config.train_text_encoder else {})
    grads = {name: {key: p.grad.clone() for key, p in module.named_parameters()} for name, module in components.items()}
    if config.token_embedding_learning_rate:
        (embedding,) = [g for key, g in grads["text_encoder"].items() if key.endswith("token_embedding.weight")]
        keep = torch.zeros(embedding.shape[0], 1)
        keep[identifier_rows] = 1
        embedding.mul_(keep)  # only the identifier's rows learn
    base = {name: {key: p.detach().clone() for key, p in module.named_parameters()}
            for name, module in components.items()}
    return HandStep(loss.item(), float(np.mean(instance_terms)), float(np.mean(prior_terms)) if prior_terms else None,
                    grads, base, first_pixels, identifier_rows)


def hand_adamw_update(hand: HandStep, config: TrainConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Weights after one AdamW step from zero state: m/sqrt(v) is g/|g| once bias-corrected, so every weight
    moves by lr * g / (|g| + eps) plus decay lr * wd * w; gradients first clipped to max_grad_norm."""
    norm = math.sqrt(sum(float(g.pow(2).sum()) for grads in hand.grads.values() for g in grads.values()))
    clip = min(1.0, config.max_grad_norm / (norm + 1e-6)) if config.max_grad_norm else 1.0
    updated = {}
    for component, grads in hand.grads.items():
        rate = config.learning_rate
        if component == "text_encoder":
            rate = config.text_encoder_learning_rate or config.learning_rate
        updated[component] = {}
        for key, grad in grads.items():
            lr, decay = rate, config.adam_weight_decay
            embeddings = component == "text_encoder" and key.endswith("token_embedding.weight")
            if embeddings and config.token_embedding_learning_rate:
                lr, decay = config.token_embedding_learning_rate, 0.0
            grad = grad * clip
            epsilon = config.adam_epsilon or 1e-8  # AdamW's own default
            updated[component][key] = hand.base[component][key] * (1 - lr * decay) - lr * grad / (grad.abs() + epsilon)
    return updated
