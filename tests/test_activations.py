"""Activation tracing: the trace on meta tensors (models built from configs) equals the same trace on the real
models `prepare_models` prepared, and on the CPU equals the memory the autograd graph holds after a real forward
pass; it computes as a CUDA GPU does (autocast's casts and weight copies, the fused attention kernels' saved
tensors), counts per image, and keeps a checkpointed block's inputs only.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dreambooth.activations import GpuCompute, trace_activations
from dreambooth.config import TrainConfig
from dreambooth.memory import estimate_for_config, estimate_memory
from dreambooth.meta_models import empty_models, write_reference_configs

from conftest import TINY_RESOLUTION
from test_memory import MODELS, prepared, train_config


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-configs")
    return {name: write_reference_configs(root / name, name) for name in ("sd15", "sdxl")}


def models_of(components) -> dict[str, torch.nn.Module]:
    return {name: getattr(components, name) for name in MODELS if getattr(components, name) is not None}


def trained_names(models: dict[str, torch.nn.Module], config: TrainConfig) -> list[str]:
    return ["unet"] + [name for name in MODELS[2:] if name in models and config.train_text_encoder]


ACTIVATION_TINY_CASES = {
    "full": dict(),
    "full, bf16, prior preservation": dict(mixed_precision="bf16", class_prompt="a photo of a cat", class_dir="c"),
    "full, checkpointing": dict(gradient_checkpointing=True),
    "full, bf16, checkpointing": dict(mixed_precision="bf16", gradient_checkpointing=True),
    "lora, bf16": dict(lora_rank=4, mixed_precision="bf16"),
    "full + text encoder, bf16": dict(train_text_encoder=True, mixed_precision="bf16"),
    "lora + text encoder, checkpointing, batch 2": dict(train_text_encoder=True, lora_rank=4,
                                                        gradient_checkpointing=True, train_batch_size=2),
}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("case", ACTIVATION_TINY_CASES)
def test_activations_traced_on_meta_are_those_of_the_prepared_models(tiny_model, tiny_sdxl_model, family, case):
    """The estimate's trace (models built from configs on the meta device, marked and cast as the trainer does)
    gives what the same trace gives on the real models `prepare_models` prepared, computed on the CPU."""
    model = tiny_model if family == "sd" else tiny_sdxl_model
    config = train_config(model, **ACTIVATION_TINY_CASES[case])
    estimate = estimate_for_config(config)
    assert estimate.batch_size == config.train_batch_size * (2 if config.with_prior_preservation else 1)
    models = models_of(prepared(model, config))
    measured = trace_activations(models, trained_names(models, config), batch_size=estimate.batch_size,
                                 resolution=TINY_RESOLUTION, mixed_precision=config.mixed_precision)
    assert estimate.activations == measured and measured.kept > 0
    assert (measured.recompute > 0) == config.gradient_checkpointing
    assert (measured.weight_copies > 0) == (config.mixed_precision != "no")


def checkpoint_without_rng_state(module, *args):
    """diffusers' checkpoint call, without the CPU RNG state torch keeps per block (host memory on a GPU too)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


@pytest.mark.parametrize("case", ["full", "full, bf16, checkpointing", "lora, bf16", "full, checkpointing"])
def test_traced_activations_are_the_memory_the_graph_holds(tiny_model, case):
    """Independently of the trace: the bytes the CPU allocator still holds after a real UNet forward pass (its
    output aside), and the saved tensors' buffers told apart by data pointer, equal what the trace counts."""
    from torch.profiler import ProfilerActivity, profile

    config = train_config(tiny_model, **ACTIVATION_TINY_CASES[case])
    models = models_of(prepared(tiny_model, config))
    if config.gradient_checkpointing:
        models["unet"].enable_gradient_checkpointing(checkpoint_without_rng_state)
    traced = trace_activations(models, ["unet"], batch_size=2, resolution=TINY_RESOLUTION,
                               mixed_precision=config.mixed_precision)
    weights = {p.untyped_storage().data_ptr() for model in models.values() for p in model.parameters()}
    buffers: dict[int, torch.Tensor] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            buffers[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    def forward():
        half = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), GpuCompute(config.mixed_precision):
            return models["unet"](torch.randn(2, 4, 16, 16), torch.zeros(2, dtype=torch.long),
                                  torch.randn(2, 77, 32, dtype=half)).sample

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = forward()
    held = sum(event.self_cpu_memory_usage for event in profiler.events()) - output.untyped_storage().nbytes()
    by_pointer = sum(tensor.untyped_storage().nbytes() for tensor in buffers.values())
    assert by_pointer == traced.kept + traced.weight_copies_kept
    assert abs(held - by_pointer) <= 1024  # the profiler also sees a few host-side scalars come and go


def test_activations_grow_with_the_batch_and_the_square_of_the_resolution(tiny_model):
    """Every kept tensor is per image: the batch multiplies them. Per latent pixel, or fixed (the prompt's 77
    tokens as keys and values): so from 32 to 64 to 128 px, each step grows 4x the one before."""
    def kept(**overrides):
        return estimate_for_config(train_config(tiny_model, mixed_precision="bf16", **overrides)).activations

    assert kept(train_batch_size=3).kept == 3 * kept().kept and kept(train_batch_size=3).largest == 3 * kept().largest
    assert kept(train_batch_size=3).weight_copies == kept().weight_copies  # the weights' copies are not per image
    small, medium, large = (kept(resolution=side).kept for side in (32, 64, 128))
    assert large - medium == 4 * (medium - small) and medium < 4 * small


def test_attention_is_kept_as_the_gpu_kernels_keep_it():
    """On meta, torch's only attention kernel is the math one, keeping a tokens x tokens matrix per head; a GPU's
    flash and memory-efficient kernels keep query, key, value, output and an fp32 log-sum-exp per query."""
    heads, tokens, width = 8, 4096, 40
    query, key, value = (torch.empty(1, heads, tokens, width, device="meta", requires_grad=True) for _ in range(3))

    def saved_bytes(compute):
        sizes = {}

        def pack(tensor):
            sizes[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), compute:
            F.scaled_dot_product_attention(query, key, value)
        return sum(sizes.values())

    one = heads * tokens * width * 4
    assert saved_bytes(GpuCompute("no")) == 4 * one + heads * tokens * 4
    assert saved_bytes(contextlib.nullcontext()) >= heads * tokens**2 * 4


def test_gpu_compute_casts_as_cuda_autocast_does():
    """Half precision for matrix products and convolutions, fp32 for norms, softmax and exp (torch's CUDA lists);
    a trained fp32 weight is cast once (autocast's cache) and its copy reported; the cache goes at the end."""
    weight = torch.nn.Parameter(torch.randn(8, 8))
    frozen = torch.randn(8, 8, dtype=torch.bfloat16)
    x = torch.randn(2, 8)
    with GpuCompute("bf16") as compute:
        first, second = F.linear(x, weight), F.linear(x, weight)
        assert first.dtype == second.dtype == (x @ x.T).dtype == F.silu(first).dtype == torch.bfloat16
        assert compute.copies == {next(iter(compute._cache.values())).untyped_storage()._cdata: 8 * 8 * 2}
        assert F.linear(x, frozen).dtype == torch.bfloat16 and len(compute.copies) == 1
        for result in (F.layer_norm(first, (8,)), F.group_norm(first.view(2, 8, 1), 2), first.softmax(-1),
                       torch.exp(first), F.interpolate(first.view(1, 2, 8, 1), scale_factor=2.0)):
            assert result.dtype == torch.float32
    assert not compute._cache and len(compute.copies) == 1
    with GpuCompute("no"):
        assert F.linear(x, weight).dtype == torch.float32


def test_checkpointing_shrinks_the_kept_activations_of_sd15(reference):
    plain, checkpointed = (estimate_memory(reference["sd15"], mixed_precision="fp16", batch_size=2,
                                           gradient_checkpointing=checkpointing).activations
                           for checkpointing in (False, True))
    assert checkpointed.kept < plain.kept / 6 and 0 < checkpointed.recompute < plain.kept / 10
    # Autocast makes the same copies, a half one of every weight of a linear or convolution layer (norms compute
    # in fp32); the backward pass then needs only those of the layers outside the checkpointed blocks.
    layers = [module for module in empty_models(str(reference["sd15"]))["unet"].modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    copied = sum(parameter.numel() for layer in layers for parameter in layer.parameters())
    assert checkpointed.weight_copies == plain.weight_copies == 2 * copied
    assert checkpointed.weight_copies_kept < plain.weight_copies_kept / 5
