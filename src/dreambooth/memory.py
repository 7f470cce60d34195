"""How much GPU memory a training run needs, before renting a GPU (`dreambooth train ... --estimate-memory`),
and what to change when a run runs out of it (`out_of_memory_message`).

The models are built from their configs alone, on the meta device, and frozen / given adapters the way
`dreambooth.prepare.prepare_models` does (`dreambooth.meta_models`); so the parameter counts are exact and an
SD 1.5 or SDXL estimate reads a few kB of JSON, no weights. Counted: weights (trained and frozen, by dtype),
gradients, the run's optimizer's state (`optimizers.optimizer_state_bytes`), cached latents, and the
activations the backward pass keeps, traced on meta tensors as a GPU would keep them (`dreambooth.activations`);
the peak adds them up.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth.activations import TEXT_ENCODERS, WEIGHT_DTYPE, Activations, trace_activations
from dreambooth.config import TrainConfig
from dreambooth.errors import UserError
from dreambooth.meta_models import config_location, empty_models, mark_trained, prepare_like_training, unique_parameters
from dreambooth.models import ModelSource, native_resolution, resolve_model
from dreambooth.optimizers import OptimizerSettings, optimizer_settings, optimizer_state_bytes

GIB = 2**30  # GPU memory is sold and reported (nvidia-smi, torch.cuda) in binary units
LATENT_BYTES = 4 * 2  # a cached latent is its distribution's mean and std, both fp32


@dataclass
class MemoryEstimate:
    """Bytes a training run holds on the GPU: `total` without activations, `peak` with them (see `not_counted`)."""

    parameters: dict[str, int]  # each model's own parameter count (unet, vae, text encoders), adapters excluded
    trained_parameters: int  # what the optimizer updates: whole models, or adapters (+ token embeddings)
    frozen_parameters: int
    trained_weights: dict[str, int]  # bytes by dtype name ("float32"); trained weights are always fp32
    frozen_weights: dict[str, int]  # bytes by dtype name: the mixed-precision dtype, or float32 without it
    gradients: int  # one fp32 gradient per trained parameter
    optimizer_state: int
    cached_latents: int
    cached_images: int
    resolution: int
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    notes: list[str] = field(default_factory=list)  # assumptions made, e.g. the architecture of a bare file
    optimizer: str = "adamw"
    batch_size: int = 1  # images in one forward pass (instance images, and as many class images)
    activations: Activations = field(default_factory=Activations)
    gradients_in_forward: bool = False  # gradient accumulation: earlier micro-batches' gradients stay
    frozen_encoders: int = 0  # bytes of the VAE's and frozen text encoders' weights (--cache moves them off)

    @property
    def weights(self) -> int:
        return sum(self.trained_weights.values()) + sum(self.frozen_weights.values())

    @property
    def total(self) -> int:
        """Weights, gradients, optimizer state and cached latents: what the run holds whatever the batch."""
        return self.weights + self.gradients + self.optimizer_state + self.cached_latents

    @property
    def peak(self) -> int:
        """The most held at once: at the end of the forward pass (activations, and every weight copy in
        autocast's cache) or in the backward pass (gradients too, and one checkpointed block recomputed)."""
        held = self.weights + self.optimizer_state + self.cached_latents + self.activations.kept
        forward = held + self.activations.weight_copies + (self.gradients if self.gradients_in_forward else 0)
        backward = held + self.gradients + self.activations.weight_copies_kept + self.activations.recompute
        return max(forward, backward)

    def not_counted(self) -> list[str]:
        """What the peak leaves out or overstates, and what checkpointing does."""
        largest = self.activations.largest / 2**20
        checkpointing = ("Gradient checkpointing is on: each block keeps only its inputs, and the backward pass "
                         "recomputes one block at a time (the largest is counted)."
                         if self.gradient_checkpointing else
                         "Gradient checkpointing is off: every layer's activations are kept for the backward pass; "
                         "--gradient-checkpointing keeps each block's inputs only, for about a third more compute.")
        return [f"Not counted: the backward pass's gradients of activations (a few tensors at a time; the largest "
                f"activation is {largest:.0f} MiB), the optimizer step's temporaries, the VAE's and frozen text "
                "encoders' forward passes, the CUDA context (~0.3-0.5 GiB), cuBLAS/cuDNN workspaces and PyTorch's "
                "allocator cache.",
                "The peak counts all gradients and all activations at once, an upper bound: the backward pass frees "
                "activations as gradients fill in. Attention is counted as a GPU's flash or memory-efficient kernel "
                "keeps it (no tokens x tokens matrix).",
                f"The peak counts the frozen text encoders and the VAE on the GPU ({self.frozen_encoders / GIB:.2f} "
                "GiB); with --cache they wait on the CPU during the steps (the VAE only when every crop is known up "
                "front: centre crops, or square photos at the resolution).",
                checkpointing]

    def lines(self) -> list[str]:
        rows = [("weights, trained " + dtype, size) for dtype, size in self.trained_weights.items()]
        rows += [("weights, frozen " + dtype, size) for dtype, size in self.frozen_weights.items()]
        rows += [("gradients float32", self.gradients), (f"optimizer state ({self.optimizer})", self.optimizer_state)]
        if self.cached_images:
            rows.append((f"cached latents ({self.cached_images} images)", self.cached_latents))
        rows += [("total without activations", self.total), ("activations", self.activations.kept)]
        if self.activations.weight_copies:
            half = _dtype_name(WEIGHT_DTYPE[self.mixed_precision])
            rows.append((f"autocast's {half} copies of trained weights", self.activations.weight_copies))
        if self.gradient_checkpointing:
            rows.append(("one block recomputed (checkpointing)", self.activations.recompute))
        rows.append(("peak", self.peak))
        models = ", ".join(f"{name} {_count(count)}" for name, count in self.parameters.items())
        images = f"{self.batch_size} image{'s' if self.batch_size != 1 else ''}"
        lines = [f"Memory estimate at {self.resolution} px, {images} per forward pass, mixed precision "
                 f"{self.mixed_precision}, optimizer {self.optimizer}, gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}",
                 f"  parameters: {models}; trained {_count(self.trained_parameters)}"]
        lines += [f"  {label:<44}{size / GIB:>8.2f} GiB" for label, size in rows]
        return lines + [*self.notes, *self.not_counted()]

    def format(self) -> str:
        return "\n".join(self.lines())


def estimate_memory(model: ModelSource | str | Path, *, lora_rank: int | None = None, lora_alpha: float | None = None,
                    lora_targets: str | None = None, train_text_encoder: bool = False,
                    token_embeddings_trained: bool = False, mixed_precision: str = "no",
                    optimizer: OptimizerSettings | str = "adamw", cached_images: int = 0,
                    resolution: int | None = None, gradient_checkpointing: bool = False, batch_size: int = 1,
                    gradient_accumulation_steps: int = 1) -> MemoryEstimate:
    """Estimate the memory of training `model` (a ModelSource, or a diffusers folder or hub id of which only
    the configs are read) with these settings; `cached_images` latents are cached (0: no cache), and one
    forward pass takes `batch_size` images."""
    if mixed_precision not in WEIGHT_DTYPE:
        raise UserError(f"--mixed-precision {mixed_precision}: choose one of {', '.join(WEIGHT_DTYPE)}")
    settings = OptimizerSettings(optimizer) if isinstance(optimizer, str) else optimizer
    with config_location(model) as (where, notes):
        estimate = _estimate(where, lora_rank, lora_alpha, lora_targets, train_text_encoder, token_embeddings_trained,
                             mixed_precision, settings, cached_images, resolution, gradient_checkpointing,
                             batch_size, gradient_accumulation_steps > 1)
    estimate = copy.deepcopy(estimate)  # the cached one stays as it was, whatever the caller does with this
    estimate.notes = notes + estimate.notes
    return estimate


# out_of_memory_message estimates a run under several switches, some alike. Keyed by the configs' location:
# a process that rewrote a model's configs in place would get the old figures.
@functools.lru_cache(maxsize=16)
def _estimate(where: str, lora_rank: int | None, lora_alpha: float | None, lora_targets: str | None,
              train_text_encoder: bool, token_embeddings_trained: bool, mixed_precision: str,
              optimizer: OptimizerSettings, cached_images: int, resolution: int | None, gradient_checkpointing: bool,
              batch_size: int, gradients_in_forward: bool) -> MemoryEstimate:
    models = empty_models(where)
    trained = mark_trained(models, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                           train_text_encoder=train_text_encoder, token_embeddings_trained=token_embeddings_trained)
    frozen = [p for p in unique_parameters(models) if not p.requires_grad]
    weight_dtype = WEIGHT_DTYPE[mixed_precision]
    # prepare_models keeps whatever learns in fp32 (autocast computes in half) and stores the rest in half.
    trained_bytes = sum(p.numel() for p in trained) * 4
    frozen_bytes = sum(p.numel() for p in frozen) * weight_dtype.itemsize
    vae = models["vae"].config
    factor = 2 ** (len(vae.block_out_channels) - 1)  # the VAE halves the image once per block but the last
    resolution = resolution or int(models["unet"].config.sample_size) * factor
    latent = vae.latent_channels * (resolution // factor) ** 2 * LATENT_BYTES
    parameters = {name: sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)
                  for name, m in models.items()}
    state = optimizer_state_bytes(optimizer, trained)  # from shapes: the parameters are still fp32 here
    trained_names = ["unet"] + [name for name in TEXT_ENCODERS if name in models and train_text_encoder]
    encoders = [parameters[name] for name in ("vae", *TEXT_ENCODERS) if name in models and name not in trained_names]
    prepare_like_training(models, trained_names, mixed_precision, gradient_checkpointing)
    activations = trace_activations(models, trained_names, batch_size=batch_size, resolution=resolution,
                                    mixed_precision=mixed_precision)
    return MemoryEstimate(
        parameters=parameters,
        trained_parameters=sum(p.numel() for p in trained),
        frozen_parameters=sum(p.numel() for p in frozen),
        trained_weights={"float32": trained_bytes} if trained_bytes else {},
        frozen_weights={_dtype_name(weight_dtype): frozen_bytes},
        gradients=trained_bytes,
        optimizer_state=state,
        cached_latents=cached_images * latent,
        cached_images=cached_images,
        resolution=resolution,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer.name,
        batch_size=batch_size,
        activations=activations,
        gradients_in_forward=gradients_in_forward,
        frozen_encoders=sum(encoders) * weight_dtype.itemsize,
    )


def estimate_for_config(config: TrainConfig, source: ModelSource | None = None, *,
                        cached_images: int = 0) -> MemoryEstimate:
    """`estimate_memory` with a run's settings (the caller knows whether latents are cached, and how many)."""
    source = source or resolve_model(config.model, config.allow_pickle, config.model_config,
                                     revision=config.revision, variant=config.variant)
    # With prior preservation a class image joins each instance image in the same forward pass.
    batch_size = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    return estimate_memory(
        source, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_targets=config.lora_targets,
        train_text_encoder=config.train_text_encoder,
        token_embeddings_trained=bool(config.token_embedding_learning_rate), mixed_precision=config.mixed_precision,
        optimizer=optimizer_settings(config), cached_images=cached_images,
        resolution=config.resolution or native_resolution(source),
        gradient_checkpointing=config.gradient_checkpointing, batch_size=batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps)


def estimate_run(config: TrainConfig) -> MemoryEstimate:
    """What `dreambooth train --estimate-memory` prints: the run's settings, its instance images and (with
    prior preservation) class images counted as cached latents unless --no-cache."""
    from dreambooth.data import list_images

    images = 0
    if config.cache:
        images = len(list_images(config.instance_dir, "--instance-dir"))
        images += config.num_class_images if config.with_prior_preservation else 0
    return estimate_for_config(config, cached_images=images)


def out_of_memory_message(config: TrainConfig, device_total_bytes: int | None, error_text: str = "") -> str:
    """One line for a run that ran out of GPU memory: what the run needs by the estimate's peak and what the
    GPU has, then the memory switches not yet on that save memory, the one that saves most for this run
    first (each saving is the estimate with that switch on against without), then any that save only once
    those are on (mixed precision in a full fine-tune: its half weight copies cost what its half activations
    save, until LoRA freezes the weights), and the estimate with all of them on. Cached latents are left out
    (a few MiB). It never raises: it explains an error already being reported."""
    switches = memory_switches(config)
    try:
        source = resolve_model(config.model, config.allow_pickle, config.model_config,
                               revision=config.revision, variant=config.variant)

        def peak(changes: dict[str, Any]) -> int:
            return estimate_for_config(dataclasses.replace(config, **changes), source).peak

        estimate = estimate_for_config(config, source)
        savings = sorted(((estimate.peak - peak(changes), flag, changes) for flag, changes in switches),
                         key=lambda saving: -saving[0])
        advice = [f"{flag} (-{_gib(saving)})" for saving, flag, _ in savings if saving > 0]
        all_on = {name: value for saving, _, changes in savings if saving > 0 for name, value in changes.items()}
        fitted = peak(all_on)
        for _, flag, changes in [saving for saving in savings if saving[0] <= 0]:
            if (saving := fitted - peak({**all_on, **changes})) > 0:
                advice.append(f"then {flag} (-{_gib(saving)} on top)")
                all_on, fitted = {**all_on, **changes}, fitted - saving
    except Exception as error:  # noqa: BLE001 - any failure here would hide the out-of-memory error itself
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        flags = ", ".join(flag for flag, _ in switches) or "a lower --resolution"
        return f"out of GPU memory (no estimate: {reason}); to use less, try {flags}"
    needs = (f"this run needs about {_gib(estimate.peak)} (weights+grads+optimizer {_gib(estimate.total, '')}, "
             f"activations {_gib(estimate.peak - estimate.total, '')})")
    has = f" and the GPU has {_gib(device_total_bytes)}" if device_total_bytes else ""
    if device_total_bytes and estimate.peak < device_total_bytes:
        has += " (more than the estimate: other processes, the CUDA context or the allocator's cache hold the rest)"
    if advice:
        advice_text = f"; to fit, try {', '.join(advice)}: about {_gib(fitted)} with them all"
    else:
        advice_text = "; every memory switch is on already: lower --resolution, or use a GPU with more memory"
    tried = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", error_text)
    return (f"out of GPU memory: {needs}{has}{advice_text}"
            + (f" (torch tried to allocate {tried[1]})" if tried else ""))


def memory_switches(config: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
    """The settings that shrink a run's memory and are not on yet: (flags, the TrainConfig fields they set)."""
    switches: list[tuple[str, dict[str, Any]]] = []
    if not config.gradient_checkpointing:
        switches.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if config.optimizer != "adamw8bit":  # Adafactor may keep less: the savings tell
        switches.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if config.mixed_precision == "no":
        switches.append(("--mixed-precision fp16", {"mixed_precision": "fp16"}))
    if not config.uses_lora:
        switches.append(("--lora-rank 16", {"lora_rank": 16}))
    if config.train_text_encoder:
        switches.append(("--no-train-text-encoder", {"train_text_encoder": False, "text_encoder_learning_rate": None,
                                                     "token_embedding_learning_rate": None}))
    if config.train_batch_size > 1:  # as many images per optimizer step, fewer per forward pass
        steps = config.train_batch_size * config.gradient_accumulation_steps
        switches.append((f"--train-batch-size 1 --gradient-accumulation-steps {steps}",
                         {"train_batch_size": 1, "gradient_accumulation_steps": steps}))
    return switches


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(size: int, unit: str = " GiB") -> str:
    return f"{size / GIB:.1f}{unit}"


def _count(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"
