"""The memory estimate: exact against the models as the trainer prepares them (tiny pipeline), its peak from
the traced activations (the trace itself: test_activations.py), and SD 1.5 / SDXL figures computed offline from
their reference configs.

Figures for the README (GiB = 2^30 bytes). Without activations (`total`: weights + gradients + optimizer state):

    SD 1.5, 512 px (UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M)
      full fine-tune, fp32, AdamW (8 B/param)          13.58 GiB
      full fine-tune, fp32, 8-bit AdamW (2 B/param)     8.80 GiB
      full fine-tune, fp16 mixed precision, AdamW      13.19 GiB
      LoRA rank 16 (attention, 3.19 M), fp16, AdamW     2.03 GiB
    SDXL base, 1024 px (UNet 2.567 B, VAE 83.7 M, text encoders 123.1 M + 694.7 M)
      full fine-tune, fp32, AdamW                      41.62 GiB
      full fine-tune, fp32, 8-bit AdamW                27.35 GiB
      full fine-tune, fp16 mixed precision, 8-bit AdamW 25.67 GiB
      LoRA rank 16 (attention, 23.2 M), fp16, AdamW     6.81 GiB
    Cached latents: 4 x (res/8)^2 x 2 x 4 B per image: 0.125 MiB at 512 px, 0.5 MiB at 1024 px.

8-bit AdamW is bitsandbytes' exact layout (`optimizers.optimizer_state_bytes`): 2 B per weight plus an fp32
absmax per block of 256 for each of its two states, 8 B per weight in tensors under 4096 weights, 2 KiB of
quantization maps (the figures were 2 B per weight flat before: 8.77, 27.27 and 25.59). AdamW's state is its
two moments and a 4-byte step counter per tensor (on the device: the trainer's AdamW is fused).

With activations (`peak`), 2 images per forward pass (1 instance + 1 class image), fp16 mixed precision:

    SD 1.5, 512 px                          activations  peak   (checkpointing: activations + 1 block)
      full fine-tune, 8-bit AdamW              2.31     12.29     0.34 + 0.17,  peak  9.13
      LoRA rank 16, AdamW                      2.13      4.17     0.33 + 0.15,  peak  2.51
    SDXL base, 1024 px
      full fine-tune, 8-bit AdamW             16.09     45.90     1.23 + 0.40,  peak 27.45
      LoRA rank 16, AdamW                     14.36     21.20     1.04 + 0.39,  peak  8.23

A full fine-tune under fp16 also holds autocast's half copies of the UNet's weights (1.60 GiB for SD 1.5, 4.78
for SDXL), until the backward pass without checkpointing; its peak counts all gradients alongside all
activations (an upper bound).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from dreambooth.config import OPTIMIZER_NAMES, TrainConfig
from dreambooth.errors import UserError
from dreambooth.memory import (GIB, MemoryEstimate, estimate_for_config, estimate_memory, memory_switches,
                               out_of_memory_message)
from dreambooth.meta_models import empty_models, write_reference_configs
from dreambooth.models import load_components, resolve_model
from dreambooth.optimizers import OptimizerSettings, make_optimizer, optimizer_state_bytes
from dreambooth.prepare import make_accelerator, prepare_models

from conftest import TINY_RESOLUTION
from test_meta_models import SD15_PARAMETERS, SDXL_PARAMETERS

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def train_config(model: Path, **overrides) -> TrainConfig:
    return TrainConfig(model=str(model), instance_dir="x", instance_prompt="a photo of miru cat", output="o",
                       **{"resolution": TINY_RESOLUTION, **overrides})


def prepared(model: Path, config: TrainConfig):
    """The components exactly as `train` holds them once `prepare_models` has run."""
    components = load_components(str(model))
    prepare_models(components, config, make_accelerator(config))
    return components


def parameters(components) -> list[torch.nn.Parameter]:
    unique = {}
    for name in MODELS:
        module = getattr(components, name)
        for parameter in module.parameters() if module is not None else []:
            unique.setdefault(id(parameter), parameter)
    return list(unique.values())


def bytes_by_dtype(params: list[torch.nn.Parameter]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for parameter in params:
        name = str(parameter.dtype).removeprefix("torch.")
        sizes[name] = sizes.get(name, 0) + parameter.nbytes
    return sizes


TINY_CASES = {
    "full": dict(),
    "full + text encoder": dict(train_text_encoder=True),
    "full, bf16": dict(mixed_precision="bf16"),
    "full + text encoder, bf16": dict(train_text_encoder=True, mixed_precision="bf16"),
    "lora unet": dict(lora_rank=4),
    "lora unet + text encoder": dict(lora_rank=4, train_text_encoder=True),
    "lora unet + text encoder, bf16": dict(lora_rank=4, train_text_encoder=True, mixed_precision="bf16"),
    "lora all-linear + text encoder": dict(lora_rank=3, lora_targets="all-linear", train_text_encoder=True),
    "lora attention+ff + token embeddings, bf16": dict(
        lora_rank=2, lora_targets="attention+ff", train_text_encoder=True, mixed_precision="bf16",
        token_embedding_learning_rate=1e-2, identifier="miru"),
}


@pytest.mark.parametrize("case", TINY_CASES)
def test_weights_and_gradients_are_those_of_the_prepared_models(tiny_model, case):
    config = train_config(tiny_model, **TINY_CASES[case])
    estimate = estimate_for_config(config)
    params = parameters(prepared(tiny_model, config))
    trained = [p for p in params if p.requires_grad]
    assert estimate.trained_weights == bytes_by_dtype(trained)
    assert estimate.frozen_weights == bytes_by_dtype([p for p in params if not p.requires_grad])
    assert estimate.trained_parameters == sum(p.numel() for p in trained)
    assert estimate.frozen_parameters == sum(p.numel() for p in params if not p.requires_grad)
    assert estimate.gradients == sum(p.nbytes for p in trained)  # gradients take their parameter's dtype
    assert estimate.total == estimate.weights + estimate.gradients + estimate.optimizer_state


@pytest.mark.parametrize("overrides", [dict(train_text_encoder=True), dict(lora_rank=4, train_text_encoder=True,
                                                                           mixed_precision="bf16")])
def test_weights_of_the_prepared_sdxl_models_with_two_text_encoders(tiny_sdxl_model, overrides):
    config = train_config(tiny_sdxl_model, **overrides)
    estimate = estimate_for_config(config)
    params = parameters(prepared(tiny_sdxl_model, config))
    assert set(estimate.parameters) == set(MODELS)
    assert estimate.trained_weights == bytes_by_dtype([p for p in params if p.requires_grad])
    assert estimate.frozen_weights == bytes_by_dtype([p for p in params if not p.requires_grad])


@pytest.mark.parametrize("case", ["full + text encoder", "lora attention+ff + token embeddings, bf16"])
def test_adamw_state_after_one_step_is_the_estimated_one(tiny_model, case):
    config = train_config(tiny_model, **TINY_CASES[case])
    trained = [p for p in parameters(prepared(tiny_model, config)) if p.requires_grad]
    # As the trainer makes it: fused, so each tensor's step counter is a tensor on the device too.
    optimizer = make_optimizer([{"params": trained, "lr": 1e-3}], OptimizerSettings("adamw"), torch.device("cpu"))
    sum(p.float().square().sum() for p in trained).backward()
    optimizer.step()
    states = [tensor for state in optimizer.state.values() for tensor in state.values()]
    assert len(optimizer.state) == len(trained)
    assert all(state["step"].dim() == 0 and state["step"].device.type == "cpu" for state in optimizer.state.values())
    moments = sum(tensor.nbytes for tensor in states if tensor.dim() > 0)
    assert moments == 8 * sum(p.numel() for p in trained)
    assert estimate_for_config(config).optimizer_state == moments + 4 * len(trained)
    assert estimate_for_config(config).gradients == sum(p.grad.nbytes for p in trained)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_the_estimate_keeps_the_state_of_the_runs_optimizer(tiny_model, name):
    """Whatever --optimizer says, from the shapes of the parameters the prepared run trains (the optimizers'
    own tests prove optimizer_state_bytes equals their real state after a step). Shapes only: Prodigy keeps
    one element, not a copy, for a tensor that is all zeros at the first step (LoRA's B), which they cannot tell."""
    config = train_config(tiny_model, optimizer=name, train_text_encoder=True, lora_rank=4, adam_beta1=0.9)
    shapes = [torch.empty_like(p, device="meta") for p in parameters(prepared(tiny_model, config)) if p.requires_grad]
    estimate = estimate_for_config(config)
    assert estimate.optimizer_state == optimizer_state_bytes(OptimizerSettings(name, beta1=0.9), shapes)
    assert estimate.optimizer == name and f"optimizer state ({name})" in estimate.format()
    assert f"optimizer {name}," in estimate.lines()[0]


def test_adamw8bit_keeps_about_a_quarter_of_adamws_state_at_sd15_size(reference):
    """bitsandbytes' 2 B per weight (+ an fp32 absmax per 256) against AdamW's 8: a quarter and a bit, full or LoRA
    (LoRA's adapters are matrices of 4096 weights and more at rank 16: every one is quantized)."""
    sd15 = resolve_model(str(reference["sd15"]))
    for lora in ({}, {"lora_rank": 16}):
        adamw, eight_bit = (estimate_for_config(train_config(reference["sd15"], optimizer=name, resolution=256, **lora),
                                                sd15) for name in ("adamw", "adamw8bit"))
        assert 0.25 < eight_bit.optimizer_state / adamw.optimizer_state < 0.255
        assert adamw.total - eight_bit.total == adamw.optimizer_state - eight_bit.optimizer_state


def test_cached_latents_are_counted_per_image_from_the_vae_config(tiny_model):
    config = train_config(tiny_model)
    base = estimate_for_config(config)
    cached = estimate_for_config(config, cached_images=5)
    # The tiny VAE halves the image once: 4 channels of 16 x 16 at 32 px, mean and std in fp32.
    assert cached.cached_latents == 5 * 4 * 16 * 16 * 2 * 4
    assert cached.total - base.total == cached.cached_latents and base.cached_latents == 0
    assert "cached latents (5 images)" in cached.format() and "cached latents" not in base.format()


def test_the_resolution_defaults_to_the_models_native_one(tiny_model):
    config = TrainConfig(model=str(tiny_model), instance_dir="x", instance_prompt="p", output="o")
    assert estimate_for_config(config, cached_images=1).resolution == TINY_RESOLUTION


def test_the_table_names_what_it_leaves_out(tiny_model):
    plain = estimate_for_config(train_config(tiny_model)).format()
    half = estimate_for_config(train_config(tiny_model, mixed_precision="bf16", gradient_checkpointing=True))
    assert "total without activations" in plain and "GiB" in plain and "peak" in plain and "CUDA context" in plain
    assert "Not counted: the backward pass's gradients of activations" in plain
    assert "checkpointing is off" in plain and "autocast" not in plain and "recomputed" not in plain
    assert "checkpointing is on" in half.format() and "autocast's bfloat16 copies of trained weights" in half.format()
    assert "one block recomputed (checkpointing)" in half.format()
    assert "weights, frozen bfloat16" in half.format() and "weights, trained float32" in half.format()
    assert half.lines()[0] == ("Memory estimate at 32 px, 1 image per forward pass, mixed precision bf16, "
                               "optimizer adamw, gradient checkpointing on")


def test_unreadable_configs_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read the model's configs"):
        estimate_memory(tmp_path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-configs")
    return {name: write_reference_configs(root / name, name) for name in ("sd15", "sdxl")}


def adamw8bit_bytes(tensors: list[torch.Tensor]) -> int:
    """bitsandbytes' layout: two uint8 states with an fp32 absmax per block of 256 weights, fp32 states for
    tensors under 4096 weights, and its two 256-entry fp32 quantization maps."""
    sizes = [tensor.numel() for tensor in tensors]
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes) + 2 * 256 * 4


def figures(reference) -> dict[str, MemoryEstimate]:
    """The README's first table (batch and resolution leave `total` alone: 256 px keeps the traces small)."""
    sd15, sdxl = str(reference["sd15"]), str(reference["sdxl"])
    cases = {
        "sd15 full": (sd15, {}),
        "sd15 full 8-bit": (sd15, dict(optimizer="adamw8bit")),
        "sd15 full fp16": (sd15, dict(mixed_precision="fp16")),
        "sd15 lora": (sd15, dict(lora_rank=16, mixed_precision="fp16")),
        "sdxl full": (sdxl, {}),
        "sdxl full 8-bit": (sdxl, dict(optimizer="adamw8bit")),
        "sdxl full fp16 8-bit": (sdxl, dict(mixed_precision="fp16", optimizer="adamw8bit")),
        "sdxl lora": (sdxl, dict(lora_rank=16, mixed_precision="fp16")),
    }
    return {name: estimate_memory(where, resolution=256, **kwargs) for name, (where, kwargs) in cases.items()}


def test_sd15_and_sdxl_figures(reference):
    estimates = figures(reference)
    sd15, sdxl = sum(SD15_PARAMETERS.values()), sum(SDXL_PARAMETERS.values())
    unet, unet_xl = SD15_PARAMETERS["unet"], SDXL_PARAMETERS["unet"]
    tensors = list(empty_models(str(reference["sd15"]))["unet"].parameters())
    tensors_xl = list(empty_models(str(reference["sdxl"]))["unet"].parameters())
    # Full fine-tune in fp32: every weight 4 B, the UNet's gradients 4 B and AdamW moments 8 B (+ 4 B of step
    # counter per tensor), or bitsandbytes' 8-bit state.
    assert estimates["sd15 full"].total == 4 * sd15 + 4 * unet + 8 * unet + 4 * len(tensors)
    assert estimates["sd15 full 8-bit"].total == 4 * sd15 + 4 * unet + adamw8bit_bytes(tensors)
    assert estimates["sd15 full fp16"].total == 2 * (sd15 - unet) + 4 * unet + 4 * unet + 8 * unet + 4 * len(tensors)
    assert estimates["sdxl full"].total == 4 * sdxl + 4 * unet_xl + 8 * unet_xl + 4 * len(tensors_xl)
    assert estimates["sdxl full fp16 8-bit"].total == (2 * (sdxl - unet_xl) + 4 * unet_xl + 4 * unet_xl
                                                       + adamw8bit_bytes(tensors_xl))
    # LoRA under fp16: the base in half, adapters (UNet attention, rank 16: 4 x 797,184 and 4 x 5,806,080 of rank
    # 4, i.e. rank x (in + out) over to_q, to_k, to_v, to_out.0; an A and a B matrix each) in fp32 with gradients
    # and moments.
    for name, total, adapters, attentions in (("sd15 lora", sd15, 3_188_736, 32), ("sdxl lora", sdxl, 23_224_320, 140)):
        assert estimates[name].trained_parameters == adapters
        assert estimates[name].total == 2 * total + (4 + 4 + 8) * adapters + 4 * attentions * 4 * 2
    # What --cache can move off the GPU during the steps: the VAE and the (frozen) text encoders, as stored.
    encoders, encoders_xl = sd15 - unet, sdxl - unet_xl
    assert estimates["sd15 full"].frozen_encoders == 4 * encoders
    assert estimates["sd15 lora"].frozen_encoders == 2 * encoders
    assert estimates["sdxl full fp16 8-bit"].frozen_encoders == 2 * encoders_xl
    assert f"on the GPU ({2 * encoders_xl / GIB:.2f} GiB)" in estimates["sdxl lora"].format()
    gib = {name: round(estimate.total / GIB, 2) for name, estimate in estimates.items()}
    assert gib == {"sd15 full": 13.58, "sd15 full 8-bit": 8.80, "sd15 full fp16": 13.19, "sd15 lora": 2.03,
                   "sdxl full": 41.62, "sdxl full 8-bit": 27.35, "sdxl full fp16 8-bit": 25.67, "sdxl lora": 6.81}


ACTIVATION_CASES = {
    "sd15 full 8-bit": ("sd15", dict(optimizer="adamw8bit")),
    "sd15 lora": ("sd15", dict(lora_rank=16)),
    "sdxl full 8-bit": ("sdxl", dict(optimizer="adamw8bit")),
    "sdxl lora": ("sdxl", dict(lora_rank=16)),
}


def test_sd15_and_sdxl_activation_figures(reference):
    """The README's second table: 1 instance + 1 class image per forward pass at the native resolution, fp16,
    without and with checkpointing (GiB: activations, the recomputed block, peak)."""
    figures = {}
    for name, (family, kwargs) in ACTIVATION_CASES.items():
        for checkpointing in (False, True):
            estimate = estimate_memory(reference[family], mixed_precision="fp16", batch_size=2,
                                       gradient_checkpointing=checkpointing, **kwargs)
            print(estimate.format())
            held = estimate.weights + estimate.optimizer_state + estimate.activations.kept
            assert estimate.peak == max(held + estimate.activations.weight_copies,
                                        held + estimate.gradients + estimate.activations.weight_copies_kept
                                        + estimate.activations.recompute)
            figures[name, checkpointing] = tuple(round(size / GIB, 2) for size in (
                estimate.activations.kept, estimate.activations.recompute, estimate.peak))
    # Checkpointing keeps a sixth of the activations or less, and rebuilds far less than it saves.
    for name in ACTIVATION_CASES:
        (kept, _, peak), (kept_checkpointed, block, peak_checkpointed) = figures[name, False], figures[name, True]
        assert kept_checkpointed < kept / 6 and block < kept / 4 and peak_checkpointed < peak
    assert figures == {
        ("sd15 full 8-bit", False): (2.31, 0.0, 12.29), ("sd15 full 8-bit", True): (0.34, 0.17, 9.13),
        ("sd15 lora", False): (2.13, 0.0, 4.17), ("sd15 lora", True): (0.33, 0.15, 2.51),
        ("sdxl full 8-bit", False): (16.09, 0.0, 45.90), ("sdxl full 8-bit", True): (1.23, 0.40, 27.45),
        ("sdxl lora", False): (14.36, 0.0, 21.20), ("sdxl lora", True): (1.04, 0.39, 8.23),
    }


def test_the_peak_is_the_larger_of_the_forward_and_the_backward_pass(tiny_model):
    """At the end of the forward pass autocast's cache holds every weight copy; in the backward pass the gradients
    fill in and one block is rebuilt. Gradient accumulation keeps the earlier micro-batches' gradients through the
    forward pass too."""
    options = dict(train_text_encoder=True, mixed_precision="bf16", gradient_checkpointing=True)
    one, accumulating = (estimate_for_config(train_config(tiny_model, gradient_accumulation_steps=steps, **options))
                         for steps in (1, 2))
    activations = one.activations
    held = one.weights + one.optimizer_state + activations.kept
    forward, backward = (held + activations.weight_copies,
                         held + one.gradients + activations.weight_copies_kept + activations.recompute)
    assert one.peak == max(forward, backward) and one.total < one.peak
    assert accumulating.peak == max(forward + one.gradients, backward) > one.peak
    assert accumulating.activations == activations and accumulating.total == one.total
    assert one.frozen_encoders == 2 * one.parameters["vae"]  # the text encoder trains: it stays on the GPU


OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 15.77 GiB of which "
                 "3.12 MiB is free.")


def test_out_of_memory_advice_is_one_line_ordered_by_what_each_switch_saves(reference):
    config = train_config(reference["sd15"], resolution=512, class_prompt="a photo of a cat", class_dir="c",
                          train_batch_size=2)
    message = out_of_memory_message(config, 16 * GIB, OUT_OF_MEMORY)
    print(message)
    assert "\n" not in message and message.startswith("out of GPU memory: this run needs about ")
    peak = estimate_for_config(config).peak
    assert f"needs about {peak / GIB:.1f} GiB" in message and "the GPU has 16.0 GiB" in message
    assert message.endswith("(torch tried to allocate 20.00 MiB)")
    savings = {flag: peak - estimate_for_config(dataclasses.replace(config, **changes)).peak
               for flag, changes in memory_switches(config)}
    assert set(savings) == {"--gradient-checkpointing", "--optimizer adamw8bit", "--mixed-precision fp16",
                            "--lora-rank 16", "--train-batch-size 1 --gradient-accumulation-steps 2"}
    assert all(saving > 0 for saving in savings.values())
    order = sorted(savings, key=lambda flag: -savings[flag])
    positions = [message.index(f"{flag} (-{savings[flag] / GIB:.1f} GiB)") for flag in order]
    assert positions == sorted(positions)
    fitted = estimate_for_config(dataclasses.replace(
        config, **{name: value for _, changes in memory_switches(config) for name, value in changes.items()})).peak
    assert f"about {fitted / GIB:.1f} GiB with them all" in message


def test_out_of_memory_advice_names_last_what_saves_only_with_the_others(reference):
    """fp16 alone does not help a full fine-tune of 2 images (autocast's copies of the weights cost about what
    half activations save); with LoRA and the others on it does, and is named after them."""
    config = train_config(reference["sd15"], resolution=512, class_prompt="a photo of a cat", class_dir="c")
    message = out_of_memory_message(config, 16 * GIB)
    fp16 = dataclasses.replace(config, mixed_precision="fp16")
    assert estimate_for_config(fp16).peak >= estimate_for_config(config).peak
    others = [flag for flag, _ in memory_switches(config) if flag != "--mixed-precision fp16"]
    assert "then --mixed-precision fp16 (-" in message
    assert max(message.index(f"{flag} (-") for flag in others) < message.index("then --mixed-precision fp16")


def test_out_of_memory_advice_repeats_no_switch_already_on(reference):
    config = train_config(reference["sd15"], resolution=512, gradient_checkpointing=True, mixed_precision="fp16")
    message = out_of_memory_message(config, None)
    assert "--gradient-checkpointing" not in message and "--mixed-precision" not in message
    assert "GPU has" not in message and "tried to allocate" not in message and "\n" not in message
    assert message.index("--lora-rank 16") < message.index("--optimizer adamw8bit")
    done = train_config(reference["sd15"], resolution=512, gradient_checkpointing=True, mixed_precision="fp16",
                        optimizer="adamw8bit", lora_rank=16)
    assert memory_switches(done) == []
    assert "every memory switch is on already" in out_of_memory_message(done, 80 * GIB)


def test_out_of_memory_advice_without_an_estimate_is_still_one_line(tmp_path):
    config = train_config(tmp_path / "gone", lora_rank=4)
    message = out_of_memory_message(config, 8 * GIB, OUT_OF_MEMORY)
    assert message.startswith("out of GPU memory (no estimate: ") and "\n" not in message
    assert message.endswith("to use less, try --gradient-checkpointing, --optimizer adamw8bit, "
                            "--mixed-precision fp16")


def test_cached_latents_at_sd15_size(reference):
    estimate = estimate_memory(reference["sd15"], cached_images=205, resolution=512)
    assert estimate.cached_latents == 205 * 4 * 64 * 64 * 2 * 4  # 200 class + 5 instance images, 26.9 MB


def test_a_bare_single_file_is_estimated_with_its_familys_reference_configs(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path))
    config = TrainConfig(model=str(path), instance_dir="x", instance_prompt="p", output="o", lora_rank=16)
    estimate = estimate_for_config(config)
    assert estimate.parameters == SD15_PARAMETERS and estimate.resolution == 512
    assert any("Architecture assumed: SD 1.5" in line for line in estimate.lines())


def test_train_estimate_memory_prints_the_estimate_and_writes_nothing(tiny_model, instance_dir, tmp_path, capsys):
    from dreambooth.cli import main

    output = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model), "--instance-dir", str(instance_dir), "--instance-prompt",
                 "a photo of miru cat", "--output", str(output), "--lora-rank", "4", "--estimate-memory"]) == 0
    printed = capsys.readouterr().out
    assert "Memory estimate at 32 px" in printed and "cached latents (3 images)" in printed and "Not counted" in printed
    assert not output.exists()
