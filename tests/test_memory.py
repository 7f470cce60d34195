"""The memory estimate: exact against the models as the trainer prepares them (tiny pipeline), and SD 1.5 /
SDXL figures computed offline from their reference configs.

Figures for the README (GiB = 2^30 bytes; weights + gradients + optimizer state, no activations, no cache):

    SD 1.5, 512 px (UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M)
      full fine-tune, fp32, AdamW (8 B/param)          13.58 GiB
      full fine-tune, fp32, 8-bit AdamW (2 B/param)     8.77 GiB
      full fine-tune, fp16 mixed precision, AdamW      13.19 GiB
      LoRA rank 16 (attention, 3.19 M), fp16, AdamW     2.03 GiB
    SDXL base, 1024 px (UNet 2.567 B, VAE 83.7 M, text encoders 123.1 M + 694.7 M)
      full fine-tune, fp32, AdamW                      41.62 GiB
      full fine-tune, fp32, 8-bit AdamW                27.27 GiB
      full fine-tune, fp16 mixed precision, 8-bit AdamW 25.59 GiB
      LoRA rank 16 (attention, 23.2 M), fp16, AdamW     6.81 GiB
    Cached latents: 4 x (res/8)^2 x 2 x 4 B per image: 0.125 MiB at 512 px, 0.5 MiB at 1024 px.

AdamW's state is counted as its two moments (exp_avg, exp_avg_sq), 8 B per trained parameter. torch's per-tensor
`step` counter is left out: a 0-dim float32 kept on the CPU (unless capturable / fused), so no GPU memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreambooth.config import TrainConfig
from dreambooth.errors import UserError
from dreambooth.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from dreambooth.memory import (GIB, empty_models, estimate_for_config, estimate_memory, mark_trained,
                               write_reference_configs)
from dreambooth.models import load_components, native_resolution, resolve_model
from dreambooth.train import make_accelerator, prepare_models

from conftest import TINY_RESOLUTION

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")

# The published parameter counts (diffusers / transformers `sum(p.numel())` of the released weights).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}


def train_config(model: Path, **overrides) -> TrainConfig:
    return TrainConfig(model=str(model), instance_dir="x", instance_prompt="a photo of miru cat", output="o",
                       resolution=TINY_RESOLUTION, **overrides)


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
    optimizer = torch.optim.AdamW(trained)
    sum(p.float().square().sum() for p in trained).backward()
    optimizer.step()
    states = [tensor for state in optimizer.state.values() for tensor in state.values()]
    assert len(optimizer.state) == len(trained)
    assert all(state["step"].dim() == 0 and state["step"].device.type == "cpu" for state in optimizer.state.values())
    moments = sum(tensor.nbytes for tensor in states if tensor.dim() > 0)
    assert estimate_for_config(config).optimizer_state == moments
    assert estimate_for_config(config).gradients == sum(p.grad.nbytes for p in trained)
    # A per-tensor rule (here: 8-bit moments, with 4 B of scale per tensor) sums over the trained tensors' shapes.
    rule = estimate_for_config(config, optimizer_state_bytes_per_param=lambda shape: 2 * shape.numel() + 4)
    assert rule.optimizer_state == sum(2 * p.numel() + 4 for p in trained)
    assert estimate_for_config(config, optimizer_state_bytes_per_param=2.0).optimizer_state == moments // 4


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
    assert "total" in plain and "GiB" in plain and "Not counted: activations" in plain and "CUDA context" in plain
    assert "checkpointing is off" in plain and "autocast" not in plain
    assert "checkpointing is on" in half.format() and "autocast's half copies" in half.format()
    assert "weights, frozen bfloat16" in half.format() and "weights, trained float32" in half.format()


def test_unreadable_configs_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read the model's configs"):
        estimate_memory(tmp_path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-configs")
    return {name: write_reference_configs(root / name, name) for name in ("sd15", "sdxl")}


def test_reference_configs_have_the_well_known_parameter_counts(reference):
    for name, expected, resolution, family in (("sd15", SD15_PARAMETERS, 512, "sd"),
                                               ("sdxl", SDXL_PARAMETERS, 1024, "sdxl")):
        models = empty_models(str(reference[name]))
        assert {part: sum(p.numel() for p in model.parameters()) for part, model in models.items()} == expected
        assert all(p.device.type == "meta" for model in models.values() for p in model.parameters())
        source = resolve_model(str(reference[name]))
        assert source.family == family and native_resolution(source) == resolution


def lora_parameters_by_shape(module: torch.nn.Module, suffixes: list[str] | None, rank: int) -> int:
    """rank x (in + out) per adapted Linear: the count without peft."""
    return sum(rank * (layer.in_features + layer.out_features) for name, layer in module.named_modules()
               if isinstance(layer, torch.nn.Linear) and (suffixes is None or name.endswith(tuple(suffixes))))


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_lora_counts_are_rank_times_in_plus_out_of_each_target(reference, targets):
    models = empty_models(str(reference["sd15"]))
    expected = sum(lora_parameters_by_shape(models[part], table.get(targets), 16)
                   for part, table in (("unet", UNET_TARGETS), ("text_encoder", TEXT_ENCODER_TARGETS)))
    trained = mark_trained(models, lora_rank=16, lora_alpha=None, lora_targets=targets, train_text_encoder=True,
                           token_embeddings_trained=False)
    assert sum(p.numel() for p in trained) == expected
    if targets == "attention":
        assert expected - 16 * 4 * 2 * 768 * 12 == 3_188_736  # the UNet's share: 4 x 797,184 of rank 4
    assert all(p.device.type == "meta" for p in trained)


def figures(reference) -> dict[str, float]:
    """The README's table, in GiB."""
    sd15, sdxl = str(reference["sd15"]), str(reference["sdxl"])
    cases = {
        "sd15 full": (sd15, {}),
        "sd15 full 8-bit": (sd15, dict(optimizer_state_bytes_per_param=2.0)),
        "sd15 full fp16": (sd15, dict(mixed_precision="fp16")),
        "sd15 lora": (sd15, dict(lora_rank=16, mixed_precision="fp16")),
        "sdxl full": (sdxl, {}),
        "sdxl full 8-bit": (sdxl, dict(optimizer_state_bytes_per_param=2.0)),
        "sdxl full fp16 8-bit": (sdxl, dict(mixed_precision="fp16", optimizer_state_bytes_per_param=2.0)),
        "sdxl lora": (sdxl, dict(lora_rank=16, mixed_precision="fp16")),
    }
    return {name: estimate_memory(where, **kwargs) for name, (where, kwargs) in cases.items()}


def test_sd15_and_sdxl_figures(reference):
    estimates = figures(reference)
    for estimate in estimates.values():
        print(estimate.format())
    sd15, sdxl = sum(SD15_PARAMETERS.values()), sum(SDXL_PARAMETERS.values())
    unet, unet_xl = SD15_PARAMETERS["unet"], SDXL_PARAMETERS["unet"]
    # Full fine-tune in fp32: every weight 4 B, the UNet's gradients 4 B and AdamW moments 8 B.
    assert estimates["sd15 full"].total == 4 * sd15 + 4 * unet + 8 * unet
    assert estimates["sd15 full 8-bit"].total == 4 * sd15 + 4 * unet + 2 * unet
    assert estimates["sd15 full fp16"].total == 2 * (sd15 - unet) + 4 * unet + 4 * unet + 8 * unet
    assert estimates["sdxl full"].total == 4 * sdxl + 4 * unet_xl + 8 * unet_xl
    assert estimates["sdxl full fp16 8-bit"].total == 2 * (sdxl - unet_xl) + 4 * unet_xl + 4 * unet_xl + 2 * unet_xl
    # LoRA under fp16: the base in half, adapters (UNet attention, rank 16: 4 x 797,184 and 4 x 5,806,080 of rank
    # 4, i.e. rank x (in + out) over to_q, to_k, to_v, to_out.0) in fp32 with gradients and moments.
    for name, total, adapters in (("sd15 lora", sd15, 3_188_736), ("sdxl lora", sdxl, 23_224_320)):
        assert estimates[name].trained_parameters == adapters
        assert estimates[name].total == 2 * total + (4 + 4 + 8) * adapters
    gib = {name: round(estimate.total / GIB, 2) for name, estimate in estimates.items()}
    assert gib == {"sd15 full": 13.58, "sd15 full 8-bit": 8.77, "sd15 full fp16": 13.19, "sd15 lora": 2.03,
                   "sdxl full": 41.62, "sdxl full 8-bit": 27.27, "sdxl full fp16 8-bit": 25.59, "sdxl lora": 6.81}


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
