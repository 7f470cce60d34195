"""The activations a training step keeps for its backward pass, counted without a GPU, for the memory estimate
(`dreambooth.memory`): what autograd saves, autocast's half copies of trained weights, and with gradient
checkpointing the largest block the backward pass rebuilds (`Activations`).

Nothing is modelled by formula: `trace_activations` runs the step's forward pass and a saved-tensors hook reads
what autograd actually keeps, each storage once. On models built on the meta device that allocates nothing, and
real models give the same figures, which on the CPU are the bytes the allocator still holds after the forward pass
(tests/test_activations.py). Only what the meta device cannot do as a GPU does is replaced, by what a CUDA
training step does (`GpuCompute`): autocast's casts and weight-copy cache (torch's autocast does nothing on meta),
and attention as the flash and memory-efficient kernels keep it (`_GpuAttention`; meta's math kernel keeps a
tokens x tokens matrix per head, GiBs a GPU never holds). Checkpointed blocks are traced through torch's own
checkpoint (`_count_recomputed_blocks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
WEIGHT_DTYPE = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by --mixed-precision


@dataclass(frozen=True)
class Activations:
    """Bytes the training forward pass leaves for the backward pass (`trace_activations`)."""

    kept: int = 0  # tensors autograd saves, each storage once; weights and their copies are not counted here
    weight_copies: int = 0  # autocast's half copies of fp32 trained weights, all held to the end of the forward
    weight_copies_kept: int = 0  # those of them the backward pass still needs (all of them without checkpointing)
    recompute: int = 0  # checkpointing: the largest checkpointed block's own activations, rebuilt in the backward
    largest: int = 0  # the largest single tensor kept: the scale of the backward pass's transient gradients


def trace_activations(models: dict[str, torch.nn.Module], trained: list[str], *, batch_size: int, resolution: int,
                      mixed_precision: str) -> Activations:
    """Run the training step's forward pass (the trained text encoders, then the UNet) on zeros of the real
    shapes on the models' device, and add up what autograd keeps for the backward pass. Meta models allocate
    nothing (about a second for SDXL); real ones give the same figures.

    What is kept is read from a saved-tensors hook, each storage once (a tensor saved by several ops, and views
    of one buffer, are one buffer); parameters are weights, not activations. The compute is a GPU's
    (`GpuCompute`): CUDA autocast's casts under mixed precision, and the fused attention kernels."""
    unet = models["unet"]
    device = next(unet.parameters()).device
    half = WEIGHT_DTYPE[mixed_precision]
    factor = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    side = resolution // factor
    encoders = [models[name] for name in TEXT_ENCODERS if name in models]
    tokens = encoders[0].config.max_position_embeddings
    saved = _SavedTensors({p.untyped_storage()._cdata for m in models.values() for p in m.parameters()})
    restore = _count_recomputed_blocks([models[name] for name in trained], saved)
    compute = GpuCompute(mixed_precision)
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack), compute:
            latents = torch.zeros(batch_size, unet.config.in_channels, side, side, device=device)  # fp32, as the step's
            timesteps = torch.zeros(batch_size, dtype=torch.long, device=device)
            if any(name in trained for name in TEXT_ENCODERS):  # trained encoders run in every step (no cache)
                ids = torch.zeros(batch_size, tokens, dtype=torch.long, device=device)
                outputs = [encoder(ids, output_hidden_states=len(encoders) > 1) for encoder in encoders]
                # SD reads the last hidden state, SDXL every encoder's penultimate one (encoding.py).
                hidden = (outputs[0][0] if len(encoders) == 1 else
                          torch.cat([output.hidden_states[-2] for output in outputs], dim=-1))
                pooled = getattr(outputs[-1], "text_embeds", None)
            else:  # a frozen encoder's output: no graph, its dtype is all that matters
                hidden = torch.zeros(batch_size, tokens, unet.config.cross_attention_dim, dtype=half, device=device)
                pooled = torch.zeros(batch_size, getattr(encoders[-1].config, "projection_dim", 1), dtype=half,
                                     device=device)
            added = {}
            if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text and six size numbers
                added = {"added_cond_kwargs": {"text_embeds": pooled,
                                               "time_ids": torch.zeros(batch_size, 6, device=device)}}
            unet(latents, timesteps, hidden, **added)
    finally:
        restore()
    kept = {key: size for key, size in saved.sizes.items() if key not in compute.copies}
    return Activations(kept=sum(kept.values()), weight_copies=sum(compute.copies.values()),
                       weight_copies_kept=sum(size for key, size in saved.sizes.items() if key in compute.copies),
                       recompute=saved.recompute, largest=max(kept.values(), default=0))


class _SavedTensors:
    """A saved-tensors pack hook that notes each saved storage's bytes once."""

    def __init__(self, weights: set[int]) -> None:
        self.weights = weights  # the parameters' storages
        self.sizes: dict[int, int] = {}
        self.held: list[torch.Tensor] = []
        self.recompute = 0  # filled by `_count_recomputed_blocks`

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # The StorageImpl's address names a buffer, as torch's own StorageWeakRef does: unlike data_ptr() it
        # tells meta storages apart. Held until the count is done, so no later storage can take the address.
        key = storage._cdata
        if key not in self.weights and key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.held.append(tensor)
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _count_recomputed_blocks(modules: list[torch.nn.Module], saved: _SavedTensors) -> Callable[[], None]:
    """Wrap the checkpoint function of every checkpointed block (diffusers' and transformers' both call
    `block._gradient_checkpointing_func(function, *inputs)`), so that `saved.recompute` ends as the largest
    block's own activations: torch's checkpoint keeps only a block's inputs (its `_NoopSaveInputs` saves them
    through the outer hook) and rebuilds the rest in the backward pass, one block at a time. Inside the block
    a hook of ours replaces the checkpoint's, so the block's saves are counted (and kept, on real tensors: this
    is a measurement, never followed by a backward pass). Returns what undoes the wrapping."""
    wrapped = []
    for module in modules:
        for block in module.modules():
            checkpoint = getattr(block, "_gradient_checkpointing_func", None)
            if getattr(block, "gradient_checkpointing", False) and checkpoint is not None:
                wrapped.append((block, checkpoint))
                block._gradient_checkpointing_func = functools.partial(_counted_checkpoint, checkpoint, saved)

    def restore() -> None:
        for block, checkpoint in wrapped:
            block._gradient_checkpointing_func = checkpoint

    return restore


def _counted_checkpoint(checkpoint: Callable, saved: _SavedTensors, function: Callable, *args, **kwargs):
    inner = _SavedTensors(saved.weights)

    def block(*block_args, **block_kwargs):
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, _unpack):
            return function(*block_args, **block_kwargs)

    output = checkpoint(block, *args, **kwargs)
    # The block's inputs are kept by the checkpoint already: rebuilding them costs nothing.
    saved.recompute = max(saved.recompute, sum(size for key, size in inner.sizes.items() if key not in saved.sizes))
    saved.held += inner.held
    return output


# CUDA autocast's policy (the lists in torch's ATen/autocast_mode.h), by the names the Python API gives the
# ops: these run in half precision, and these in fp32 (norms, softmax, reductions, upsampling...). Other ops run
# in their inputs' dtype, type promotion doing what autocast's "promote" list does for these models.
HALF_OPS = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "prelu", "addmm", "addmv", "addr", "matmul", "rmatmul", "einsum", "mm", "mv", "linear", "addbmm", "baddbmm",
    "bmm", "chain_matmul", "multi_dot", "vecdot", "scaled_dot_product_attention"})
FLOAT32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "rpow", "softplus", "layer_norm", "rms_norm", "group_norm", "norm", "nuclear_norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "interpolate", "upsample", "prod", "softmax", "log_softmax",
    "cumprod", "cumsum", "vector_norm", "matrix_norm", "sum"})


class GpuCompute(TorchFunctionMode):
    """Compute as a CUDA GPU training step does, on any device, meta included (where torch's autocast does
    nothing): under mixed precision, CUDA autocast's casts, with its cache of the half copies of trained
    (fp32, leaf) weights, held until the region ends; and scaled_dot_product_attention as `_GpuAttention`.
    `copies` gives each weight copy's storage and bytes."""

    def __init__(self, mixed_precision: str) -> None:
        super().__init__()
        self.half = None if mixed_precision == "no" else WEIGHT_DTYPE[mixed_precision]
        self.copies: dict[int, int] = {}
        self._cache: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "").strip("_")
        if self.half is not None and (name in HALF_OPS or name in FLOAT32_OPS):
            dtype = self.half if name in HALF_OPS else torch.float32
            args, kwargs = self._cast(args, dtype), self._cast(kwargs, dtype)
        if func is F.scaled_dot_product_attention:
            return _GpuAttention.apply(*_attention_arguments(*args, **kwargs))
        return func(*args, **kwargs)

    def __exit__(self, *exc_info):
        self._cache.clear()  # as autocast's, when its region ends
        return super().__exit__(*exc_info)

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if type(value) in (list, tuple):
            return type(value)(self._cast(item, dtype) for item in value)
        if type(value) is dict:
            return {key: self._cast(item, dtype) for key, item in value.items()}
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype in (dtype,
                                                                                                  torch.float64):
            return value
        if not (dtype == self.half and value.dtype == torch.float32 and value.is_leaf and value.requires_grad):
            return value.to(dtype)
        if id(value) not in self._cache:
            self._cache[id(value)] = copy = value.to(dtype)
            self.copies[copy.untyped_storage()._cdata] = copy.untyped_storage().nbytes()
        return self._cache[id(value)]


def _attention_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False) -> tuple:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class _GpuAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a GPU's flash or memory-efficient kernel keeps it for the backward pass:
    query, key, value, mask, the output (laid out [batch, tokens, heads, dim] as theirs is, so the caller's
    transpose back needs no copy) and each query row's log-sum-exp in fp32. The math kernel, the only one on
    meta, keeps the tokens x tokens attention matrix instead: 4096 x 4096 per head in SD 1.5's first blocks at
    512 px, GiBs that a GPU never holds. Measurement only: it has no backward pass."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        batch, heads, tokens = query.shape[:3]
        output = query.new_empty(batch, tokens, heads, value.shape[-1]).transpose(1, 2)
        output.copy_(F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                    enable_gqa=enable_gqa))
        log_sum_exp = query.new_empty(batch, heads, tokens, dtype=torch.float32)
        masks = [attn_mask] if isinstance(attn_mask, torch.Tensor) else []
        ctx.save_for_backward(query, key, value, output, log_sum_exp, *masks)
        return output

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("_GpuAttention measures memory only; it has no backward pass")
