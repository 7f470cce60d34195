"""Latent and prompt-embedding caches: the frozen encoders' work done once per distinct input.

A DreamBooth run shows the same few photos (in a few crops and flips) and the same few prompts thousands of
times, and the frozen VAE and text encoder give the same answer every time. The step still calls
`vae.encode(pixels)` and `text_encoder(token_ids)`; in a cached run those objects are the wrappers below,
which answer from memory what they have seen, so the step cannot tell which it got.

Keys are the inputs themselves (the exact pixels of a crop, the token ids of a prompt), so a changed image,
crop, flip, resolution or prompt is a new entry by construction; a cache lives as long as its run, with its
one VAE and text encoder. Each input is encoded on its own, never in a batch: its result is then a pure
function of the input, identical whichever batch or step first needed it, so a resumed run (whose cache
starts empty) computes exactly what the uninterrupted run computed.

The VAE's latent *distribution* (mean and standard deviation) is cached, not a latent: the step still draws
a fresh latent from it with its own generator, as it does from the VAE, so training is unchanged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

# The latent cache's memory bound: about 15,000 SD-sized 512-px crops (mean and std, fp32). Many random crops
# of many non-square class images would otherwise grow it without end; the least recently used go first.
LATENT_CACHE_BYTES = 2 * 1024**3


@dataclass
class LatentDistribution:
    """What the step reads of diffusers' DiagonalGaussianDistribution."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class EncodeOutput:
    latent_dist: LatentDistribution


class CachedVAE:
    """A frozen VAE that encodes each distinct image once; everything else is the VAE's own."""

    def __init__(self, vae: torch.nn.Module, max_bytes: int = LATENT_CACHE_BYTES) -> None:
        self.vae = vae
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:  # config, device, dtype, ...: the VAE's
        return getattr(self.vae, name)

    def fill(self, images: Iterable[torch.Tensor]) -> None:
        """Encode these images now (each alone, as a step would), so the steps find them all cached."""
        for image in images:
            self.encode(image[None].to(device=self.vae.device, dtype=self.vae.dtype))

    def encode(self, pixel_values: torch.Tensor) -> EncodeOutput:
        means, stds = [], []
        for image in pixel_values:
            key = _key(image)
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                with torch.no_grad():
                    distribution = self.vae.encode(image[None]).latent_dist
                self._store(key, distribution.mean[0], distribution.std[0])
            mean, std = self.entries[key]
            means.append(mean)
            stds.append(std)
        return EncodeOutput(LatentDistribution(torch.stack(means), torch.stack(stds)))

    def _store(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.entries[key] = (mean, std)
        self.bytes += mean.nbytes + std.nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, (old_mean, old_std) = self.entries.popitem(last=False)
            self.bytes -= old_mean.nbytes + old_std.nbytes


class CachedTextEncoder:
    """A frozen text encoder that encodes each distinct prompt (row of token ids) once."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        self.text_encoder = text_encoder
        self.entries: dict[tuple, Any] = {}
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.text_encoder, name)

    def __call__(self, token_ids: torch.Tensor, output_hidden_states: bool = False):
        rows = []
        for row in token_ids:
            key = (tuple(row.tolist()), output_hidden_states)
            if key in self.entries:
                self.hits += 1
            else:
                self.misses += 1
                with torch.no_grad():
                    self.entries[key] = self.text_encoder(row[None], output_hidden_states=output_hidden_states)
            rows.append(self.entries[key])
        return _stack_outputs(rows)


def _stack_outputs(outputs: list) -> Any:
    """One model output for a batch from the outputs of its rows (same class; tensors concatenated on the
    batch axis, tuples of tensors element by element)."""
    first = outputs[0]
    fields = {}
    for name in first.keys():
        values = [output[name] for output in outputs]
        if isinstance(values[0], tuple):
            fields[name] = tuple(torch.cat(parts) for parts in zip(*values))
        else:
            fields[name] = torch.cat(values)
    return type(first)(**fields)


def _key(image: torch.Tensor) -> str:
    """The exact pixels (and their dtype and shape) of one image, as a short digest."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    return digest.hexdigest()
