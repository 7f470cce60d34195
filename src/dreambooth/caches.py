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

Optionally the latent cache also lives on disk (`CachedVAE(vae, folder=...)`), for class sets too large to
encode again on every run: one small safetensors file per image, under a subfolder named by the VAE's
fingerprint (its weights, dtype, class and encode settings, and the kind of device it computes on), so a
swapped VAE, or the same one in another dtype, never meets another's latents, and runs or trials sharing a
folder and a VAE share its entries.

Once every input a run will show is cached (`CachedVAE.fill`, `fill_prompts`), the encoders can leave the
accelerator (`offload`); an input not cached after all brings the model back to the device it computed on
(its home) before it is encoded, so no result depends on where the model was meanwhile. `restore` brings it
back explicitly (validation decodes with the VAE).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth.encoding import encode_prompts, encode_prompts_sdxl

# The latent cache's memory bound: about 15,000 SD-sized 512-px crops (mean and std, fp32). Many random crops
# of many non-square class images would otherwise grow it without end; the least recently used go first.
LATENT_CACHE_BYTES = 2 * 1024**3

# Bumped when the files' layout or meaning changes: a new fingerprint, so old files are never read.
DISK_FORMAT = "latent-distribution-v1"

# VAE attributes besides its weights that change what `encode` computes (diffusers' tiled encoding).
ENCODE_SETTINGS = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


class EncoderOffloaded(RuntimeError):
    """An input missed the cache while its encoder was offloaded to a device it cannot come back from."""


@dataclass
class LatentDistribution:
    """What the step reads of diffusers' DiagonalGaussianDistribution."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class EncodeOutput:
    latent_dist: LatentDistribution


class _Offloadable:
    """Moving the wrapped model off its device while the cache answers, and back (see `offload`)."""

    _home: torch.device | None = None  # where the model computes; set by the first offload
    _away: torch.device | None = None  # where offload put it; None when it is not offloaded
    # Inputs come on the CPU (encoding.input_device): keys are read there, without waiting for a GPU; a miss
    # sends its input to the model's device, and every answer lives there.
    keys_inputs_on_cpu = True

    def _model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """The device the model computes on (its home while offloaded): inputs go there, answers live there."""
        return self._home if self.offloaded else _device_of(self._model())

    @property
    def offloaded(self) -> bool:
        """Whether the model is away from its home (a later move by anyone else counts as bringing it back)."""
        return self._away is not None and _device_of(self._model()) == self._away

    def offload(self, device: torch.device | str = "cpu") -> None:
        """Move the model to `device` (e.g. "cpu") to free its home device for training; the cache still
        answers what it holds without touching the model. A miss brings the model home first (see `restore`),
        and it stays there. "meta" drops the weights altogether: a miss then raises EncoderOffloaded."""
        if not self.offloaded:
            self._home = _device_of(self._model())
        self._model().to(device)
        self._away = _device_of(self._model())

    def restore(self) -> None:
        """Bring an offloaded model back to its home device (nothing to do when it is there)."""
        if self.offloaded:
            if self._away.type == "meta":
                raise EncoderOffloaded(
                    f"{type(self._model()).__name__} was offloaded to the meta device (its weights were dropped), "
                    "and an input it has not cached needs it: offload to 'cpu' when inputs may still be new")
            self._model().to(self._home)
        self._away = None


class CachedVAE(_Offloadable):
    """A frozen VAE that encodes each distinct image once; everything else is the VAE's own.

    `hits` counts answers from memory, `disk_hits` answers read from `folder`, `misses` images the VAE encoded.
    The VAE must not change (weights, dtype) after its first encode: the fingerprint is taken then, once.
    """

    def __init__(self, vae: torch.nn.Module, max_bytes: int = LATENT_CACHE_BYTES, folder: Path | str | None = None):
        self.vae = vae
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder is not None else None
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.disk_hits = 0
        self._fingerprint: str | None = None
        self._write_failed = False

    def __getattr__(self, name: str) -> Any:  # config, dtype, ...: the VAE's
        return getattr(self.vae, name)

    def _model(self) -> torch.nn.Module:
        return self.vae

    def fill(self, images: Iterable[torch.Tensor]) -> None:
        """Encode these images now (each alone, as a step would), so the steps find them all cached."""
        for image in images:
            self.encode(image[None].to(dtype=self.vae.dtype))  # keyed on the CPU, like the step's inputs

    def encode(self, pixel_values: torch.Tensor) -> EncodeOutput:
        means, stds = [], []
        for image in pixel_values:
            key = _key(image)
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
            elif (stored := self._read(key)) is not None:
                self.disk_hits += 1
                self._store(key, *stored)
            else:
                self.misses += 1
                self.restore()
                with torch.no_grad():
                    distribution = self.vae.encode(image[None].to(self.device)).latent_dist
                # Copies: the mean is a view of a tensor twice its size (mean and log-variance).
                mean, std = distribution.mean[0].clone(), distribution.std[0].clone()
                self._store(key, mean, std)
                self._write(key, mean, std)
            mean, std = self.entries[key]
            means.append(mean)
            stds.append(std)
        return EncodeOutput(LatentDistribution(torch.stack(means), torch.stack(stds)))

    def offload(self, device: torch.device | str = "cpu") -> None:
        if self.folder is not None and not self.offloaded:
            _ = self.fingerprint  # taken while the weights are still at home (they may be dropped)
        super().offload(device)

    @property
    def fingerprint(self) -> str:
        """The VAE's identity, taken once: its weights (names, dtypes, shapes, bytes), class, encode settings and
        the kind of device it computes on. One pass of blake2b over the weights, about 0.9 GB/s: measured on SD's
        VAE (AutoencoderKL with block_out_channels (128, 256, 512, 512), random weights: 83.7M parameters),
        0.36 s in fp32 (319 MiB) and 0.19 s in fp16 on one CPU core, plus the copy off an accelerator; once per
        run, against a second or so of encoding per hundred 512-px images."""
        if self._fingerprint is None:
            self._fingerprint = vae_fingerprint(self.vae, self.device)
        return self._fingerprint

    def path(self, key: str) -> Path:
        """The file of one entry (only with a folder)."""
        assert self.folder is not None
        return self.folder / self.fingerprint / f"{key}.safetensors"

    def _store(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.entries[key] = (mean, std)
        self.bytes += mean.nbytes + std.nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, (old_mean, old_std) = self.entries.popitem(last=False)
            self.bytes -= old_mean.nbytes + old_std.nbytes

    def _read(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry stored on disk, or None when there is none, or it is unreadable or corrupt (it is then
        encoded again and the file overwritten)."""
        if self.folder is None:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                metadata = file.metadata() or {}
                if set(file.keys()) != {"mean", "std"}:
                    raise ValueError(f"holds {sorted(file.keys())}, not mean and std")
                mean, std = file.get_tensor("mean"), file.get_tensor("std")
            if metadata.get("digest") != _entry_digest(key, mean, std):
                raise ValueError("its contents do not match their digest")
        except Exception as error:  # truncated, garbled, unreadable: a miss, never a crash
            warnings.warn(f"latent cache file {path} is unreadable ({error}); encoding that image again",
                          stacklevel=3)
            return None
        return mean.to(self.device), std.to(self.device)

    def _write(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store an entry on disk, atomically: a temporary file in the same folder, renamed over the entry, so a
        killed run leaves a whole file or none (and concurrent writers of one entry write the same bytes)."""
        if self.folder is None:
            return
        from safetensors.torch import save_file

        path = self.path(key)
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"mean": mean.detach().contiguous().cpu(), "std": std.detach().contiguous().cpu()}
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
            os.close(handle)
            save_file(tensors, temporary, metadata={"digest": _entry_digest(key, **tensors)})
            os.replace(temporary, path)
            temporary = None
        except OSError as error:  # a full disk or read-only shared folder: the run goes on from memory
            if not self._write_failed:
                warnings.warn(f"cannot write the latent cache under {self.folder} ({error}); keeping latents in "
                              "memory only", stacklevel=3)
            self._write_failed = True
        finally:  # an interrupted write leaves no temporary file behind (a killed process may: never read)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)


class CachedTextEncoder(_Offloadable):
    """A frozen text encoder that encodes each distinct prompt (row of token ids) once."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        self.text_encoder = text_encoder
        self.entries: dict[tuple, Any] = {}
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.text_encoder, name)

    def _model(self) -> torch.nn.Module:
        return self.text_encoder

    def fill(self, token_ids: torch.Tensor | Iterable[torch.Tensor], output_hidden_states: bool = False) -> None:
        """Encode these rows of token ids now, each alone, as the step will call the encoder: SD calls it with
        output_hidden_states=False, SDXL both encoders with True (`fill_prompts` does it for a step's models)."""
        for row in token_ids:
            self._entry(row.cpu(), output_hidden_states)

    def __call__(self, token_ids: torch.Tensor, output_hidden_states: bool = False):
        return _stack_outputs([self._entry(row, output_hidden_states) for row in token_ids])

    def _entry(self, row: torch.Tensor, output_hidden_states: bool) -> Any:
        key = (tuple(row.tolist()), output_hidden_states)
        if key in self.entries:
            self.hits += 1
        else:
            self.misses += 1
            self.restore()
            with torch.no_grad():
                self.entries[key] = self.text_encoder(row[None].to(self.device),
                                                      output_hidden_states=output_hidden_states)
        return self.entries[key]


def fill_prompts(models: Any, prompts: Iterable[str], device: torch.device | str | None = None) -> None:
    """Encode every prompt now, each alone, through the very calls the step makes (`encoding.encode_prompts`, or
    `encode_prompts_sdxl` when `models` has a text_encoder_2), so the steps find them all cached. The step's
    text encoders must be CachedTextEncoders (a trained encoder is not cached); `device` defaults to theirs."""
    encoders = [models.text_encoder]
    tokenizers = [models.tokenizer]
    if getattr(models, "text_encoder_2", None) is not None:
        encoders.append(models.text_encoder_2)
        tokenizers.append(models.tokenizer_2)
    if not all(isinstance(encoder, CachedTextEncoder) for encoder in encoders):
        raise TypeError("fill_prompts needs the step's text encoders behind CachedTextEncoder")
    device = encoders[0].device if device is None else device
    for prompt in dict.fromkeys(prompts):
        if len(encoders) == 1:
            encode_prompts(encoders[0], tokenizers[0], [prompt], device)
        else:
            encode_prompts_sdxl(encoders, tokenizers, [prompt], device)


def vae_fingerprint(vae: torch.nn.Module, device: torch.device | str | None = None) -> str:
    """A digest of what a VAE's encoding depends on: its class, weights (names, dtypes, shapes and bytes), encode
    settings (tiling), the device kind it computes on ("cuda", "cpu": kernels differ in the last bits) and the
    cache's file format."""
    digest = hashlib.blake2b(digest_size=16)
    device = torch.device(device) if device is not None else _device_of(vae)
    settings = {name: getattr(vae, name) for name in ENCODE_SETTINGS if hasattr(vae, name)}
    header = f"{DISK_FORMAT}|{type(vae).__module__}.{type(vae).__qualname__}|{settings}|{device.type}"
    digest.update(header.encode())
    for name, tensor in vae.state_dict().items():
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_bytes_of(tensor))
    return digest.hexdigest()


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


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _bytes_of(tensor: torch.Tensor):
    """A tensor's bytes in memory order, on the CPU (no copy when it is there already and contiguous)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _entry_digest(key: str, mean: torch.Tensor, std: torch.Tensor) -> str:
    """A disk entry's check: its key and tensors (dtype, shape, bytes), so a garbled or misplaced file is refused."""
    digest = hashlib.blake2b(key.encode(), digest_size=16)
    for tensor in (mean, std):
        digest.update(f"|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_bytes_of(tensor))
    return digest.hexdigest()


def _key(image: torch.Tensor) -> str:
    """The exact pixels (and their dtype and shape) of one image, as a short digest."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    return digest.hexdigest()
