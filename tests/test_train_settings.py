"""Every training setting does what it says: one row per TrainConfig field that changes training.

Each row runs the real `train` on the tiny model and checks the setting's effect against an independent
computation written out by hand below (`hand_first_step`): the first step's loss, its gradient and the
AdamW update it implies, or the learning rate and gradient norm the optimizer saw at each step. The hand
computation shares only the documented random-draw contract with the package (which seed each draw comes
from, `seeds.mix`), not its code: a setting that stops working changes one side only.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.config import TrainConfig
from dreambooth.train import train

from conftest import TINY_RESOLUTION
from hand_step import HandStep, hand_adamw_update, hand_first_step

R = TINY_RESOLUTION
INSTANCE_PROMPT = "a photo of miru cat"
CLASS_PROMPT = "a photo of a cat"


# ------------------------------------------------------------------------------------------------------
# Data written for these tests: photos larger than the resolution and not square, so resizing and
# cropping matter; masks; class images.


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("settings-data")
    rng = np.random.default_rng(5)
    for folder in ("instance", "masks", "classes"):
        (root / folder).mkdir()
    for i, (width, height) in enumerate([(44, 36), (36, 52), (40, 40)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "instance" / f"photo{i}.png")
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[height // 4 : height * 3 // 4, width // 5 : width * 3 // 5] = 255
        Image.fromarray(mask).save(root / "masks" / f"photo{i}.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (R, R + 8, 3), dtype=np.uint8)).save(root / "classes" / f"cat{i}.png")
    return root


def settings(model: Path, data: dict, output: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model), instance_dir=str(data / "instance"), instance_prompt=INSTANCE_PROMPT,
                  output=str(output), resolution=R, max_train_steps=1, learning_rate=1e-3, seed=3,
                  adam_weight_decay=0.0)
    values.update(overrides)
    if values.get("class_prompt"):  # the folder holds 3: none is generated
        values.update(class_dir=str(data / "classes"), num_class_images=values.get("num_class_images", 3))
    if values.pop("masked", False):
        values["instance_mask_dir"] = str(data / "masks")
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------------
# Observing the trainer from outside: every optimizer step and the inputs of the VAE and UNet.


@dataclass
class Observed:
    steps: list[dict] = field(default_factory=list)  # per optimizer step: group lrs, decays, gradient norm
    vae_inputs: list[torch.Tensor] = field(default_factory=list)
    unet_layer_dtypes: set = field(default_factory=set)
    checkpointing: set = field(default_factory=set)
    # Frozen or trained, and stored in which dtypes: "vae" / "text_encoder" -> {(requires_grad, dtype)}.
    frozen_parts: dict = field(default_factory=lambda: {"vae": set(), "text_encoder": set()})


@contextlib.contextmanager
def observe():
    from diffusers import UNet2DConditionModel
    from diffusers.models.autoencoders.vae import Encoder
    from transformers import CLIPTextModel
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = Observed()
    unet_layers: set[int] = set()

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.steps.append({
            "lrs": [group["lr"] for group in optimizer.param_groups],
            "weight_decays": [group["weight_decay"] for group in optimizer.param_groups],
            "betas": [group.get("betas") for group in optimizer.param_groups],
            "optimizer": type(optimizer).__name__,
            "sizes": [sum(p.numel() for p in group["params"]) for group in optimizer.param_groups],
            "grad_norm": float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))),
        })

    def before_forward(module, args):
        if isinstance(module, UNet2DConditionModel):
            unet_layers.update(id(layer) for layer in module.modules())
            seen.checkpointing.add(module.is_gradient_checkpointing)
        elif isinstance(module, (Encoder, CLIPTextModel)):  # vae.encode() calls its Encoder, not forward()
            part = "vae" if isinstance(module, Encoder) else "text_encoder"
            seen.frozen_parts[part].update((p.requires_grad, p.dtype) for p in module.parameters())
            if part == "text_encoder" and module.training:  # only a trained encoder is checkpointed
                seen.checkpointing.add(getattr(module, "is_activation_checkpointing", None))

    def after_forward(module, args, output):
        if isinstance(module, Encoder):
            seen.vae_inputs.append(args[0].detach().clone())
        elif isinstance(module, torch.nn.Linear) and id(module) in unet_layers:
            seen.unet_layer_dtypes.add(output.dtype)

    handles = [register_optimizer_step_pre_hook(before_step), register_module_forward_pre_hook(before_forward),
               register_module_forward_hook(after_forward)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def recorded(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def saved(run: Path, component: str) -> dict[str, torch.Tensor]:
    (file,) = (run / "pipeline" / component).glob("*.safetensors")
    return load_file(file)


def assert_weights_follow_adamw(run: Path, hand: HandStep, config: TrainConfig) -> None:
    """Weights whose gradient is far above AdamW's eps must match to 0.1% of a step; where the gradient is
    about eps (sums that cancel to rounding noise), g / (|g| + eps) is rounding noise too, so those are only
    held to moving at most one step."""
    smallest_rate = min(r for r in (config.learning_rate, config.text_encoder_learning_rate) if r)
    for component, expected in hand_adamw_update(hand, config).items():
        actual = saved(run, component)
        for key, value in expected.items():
            error = (actual[key] - value).abs()
            clear = hand.grads[component][key].abs() > 1e-6
            off = float(torch.where(clear, error, 0).max())
            assert off < 1e-3 * smallest_rate, f"{component} {key}: {off:g} off the AdamW step"
            assert float(error.max()) < 2.01 * max(config.learning_rate, config.token_embedding_learning_rate or 0)


# ------------------------------------------------------------------------------------------------------
# The table: a row per setting.


def check_first_step(run: Path, hand: HandStep, config: TrainConfig, seen: Observed) -> None:
    """The loss the trainer recorded is the hand loss, and the weights moved as AdamW moves them."""
    first = recorded(run)[0]
    assert first["loss"] == pytest.approx(hand.loss, rel=1e-5)
    assert first["instance_loss"] == pytest.approx(hand.instance_loss, rel=1e-5)
    if hand.prior_loss is not None:
        assert first["prior_loss"] == pytest.approx(hand.prior_loss, rel=1e-5)
    assert len(seen.steps) == config.max_train_steps  # one optimizer step per step, whatever the accumulation
    assert seen.frozen_parts["vae"] == {(False, torch.float32)}  # frozen: no gradients kept for it
    assert seen.frozen_parts["text_encoder"] == {(config.train_text_encoder, torch.float32)}
    if config.max_train_steps == 1:
        assert_weights_follow_adamw(run, hand, config)


def check_pixels(run, hand, config, seen) -> None:
    check_first_step(run, hand, config, seen)
    # Exactly the crops and flips by hand (one batch, or with the cache one image at a time).
    assert torch.allclose(torch.cat(seen.vae_inputs)[: len(hand.pixels)], hand.pixels, atol=1e-6)


def check_cache(run, hand, config, seen) -> None:
    """With the cache (the default), the VAE encodes each distinct image once, one at a time, before the first
    step, and the losses are the hand's (each image encoded alone: equal up to float rounding)."""
    first = recorded(run)[0]
    assert first["loss"] == pytest.approx(hand.loss, rel=1e-5)
    assert [len(inputs) for inputs in seen.vae_inputs] == [1, 1, 1]  # 3 photos, 3 steps of 3: 3 encodes
    encoded = torch.cat(seen.vae_inputs)
    assert all(any(torch.allclose(image, other, atol=1e-6) for other in encoded) for image in hand.pixels)


def check_learning_rate_schedule(run, hand, config, seen) -> None:
    """The rate applied at step s (s = 0, 1, ...) is lr * factor(s): warm-up s / w, then the schedule's decay."""
    total, warmup = config.max_train_steps, config.lr_warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / (total - warmup)
        return {"constant": 1.0, "constant_with_warmup": 1.0, "linear": 1 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[config.lr_scheduler]

    expected = [config.learning_rate * factor(step) for step in range(total)]
    assert [s["lrs"][0] for s in seen.steps] == pytest.approx(expected, abs=1e-12)
    assert [r["lr"] for r in recorded(run)] == pytest.approx(expected, abs=1e-12)


def check_clipping(run, hand, config, seen) -> None:
    norm = math.sqrt(sum(float(g.pow(2).sum()) for grads in hand.grads.values() for g in grads.values()))
    assert recorded(run)[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)  # measured before clipping
    limit = config.max_grad_norm or math.inf
    assert norm > 1e-3  # so that the row with a 1e-3 limit really clips
    assert seen.steps[0]["grad_norm"] == pytest.approx(min(norm, limit), rel=1e-4)  # what the optimizer saw


def check_groups(run, hand, config, seen) -> None:
    """Each trained part learns at its own rate; with a token-embedding rate only the identifier's rows move."""
    check_first_step(run, hand, config, seen)
    lrs, decays = seen.steps[0]["lrs"], seen.steps[0]["weight_decays"]
    assert lrs[0] == config.learning_rate and lrs[1] == config.text_encoder_learning_rate
    if config.token_embedding_learning_rate:
        assert lrs[2] == config.token_embedding_learning_rate and decays[2] == 0.0
        (key,) = [key for key in hand.base["text_encoder"] if key.endswith("token_embedding.weight")]
        moved = (saved(run, "text_encoder")[key] != hand.base["text_encoder"][key]).any(dim=1)
        assert moved.nonzero().flatten().tolist() == hand.identifier_rows


ATTENTION = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}


def check_lora(run, hand, config, seen) -> None:
    """LoRA's first step by hand: B starts at zero, so the loss is the base model's and dL/dA = 0, while
    dL/dB = (alpha / rank) * dL/dW @ A^T for each adapted layer W. AdamW then moves B by lr * g / (|g| + eps)
    and leaves A alone. The gradient norm (over B's gradients) carries alpha / rank."""
    from dreambooth.lora import LORA_WEIGHTS

    assert recorded(run)[0]["loss"] == pytest.approx(hand.loss, rel=1e-5)
    adapters = load_file(run / "lora" / LORA_WEIGHTS)
    scale = config.lora_alpha / config.lora_rank
    expected_b, gradients = {}, []
    for key, down in adapters.items():
        if not key.endswith(".lora_A.weight"):
            continue
        part, rest = key.split(".", 1)
        layer = rest.removesuffix(".lora_A.weight")
        assert layer.endswith(ATTENTION[part]) and down.shape[0] == config.lora_rank  # attention layers, rank R
        gradient = scale * hand.grads[part][layer + ".weight"] @ down.T
        gradients.append(gradient)
        expected_b[key.replace(".lora_A.", ".lora_B.")] = gradient
    adapted = {(part, name) for part, names in hand.grads.items() for name in names
               if name.removesuffix(".weight").endswith(ATTENTION[part])}
    assert len(expected_b) == len(adapted)  # every attention layer of the UNet and text encoder, nothing else
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in gradients))
    assert recorded(run)[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    clip = min(1.0, config.max_grad_norm / (norm + 1e-6))
    for key, gradient in expected_b.items():
        step = -config.learning_rate * clip * gradient / (clip * gradient.abs() + 1e-8)
        clear = gradient.abs() > 1e-6
        assert float(torch.where(clear, (adapters[key] - step).abs(), 0).max()) < 1e-3 * config.learning_rate, key


def check_betas(run, hand, config, seen) -> None:
    """AdamW's first step from zero state does not depend on its betas (bias correction makes m / sqrt(v) =
    g / |g|), so the row checks that the given betas are the ones every step's groups carry."""
    check_first_step(run, hand, config, seen)
    assert {beta for step in seen.steps for beta in step["betas"]} == {(config.adam_beta1, config.adam_beta2)}


def check_lion(run, hand, config, seen) -> None:
    """Lion's first step from a zero momentum: every weight moves by lr * sign(g) (clipping keeps the sign)
    after the decoupled decay w * (1 - lr * wd)."""
    assert seen.steps[0]["optimizer"] == "Lion"
    assert recorded(run)[0]["loss"] == pytest.approx(hand.loss, rel=1e-5)
    actual = saved(run, "unet")
    decay, rate = config.adam_weight_decay, config.learning_rate
    for key, grad in hand.grads["unet"].items():
        expected = hand.base["unet"][key] * (1 - rate * decay) - rate * torch.sign(grad)
        clear = grad.abs() > 1e-6  # where the sign is not rounding noise
        assert float(torch.where(clear, (actual[key] - expected).abs(), 0).max()) < 1e-3 * rate, key


def check_bf16(run, hand, config, seen) -> None:
    """bf16 autocast: the UNet's layers compute in bfloat16, and the loss is the fp32 loss to bf16 precision."""
    assert torch.bfloat16 in seen.unet_layer_dtypes
    # Frozen parts are stored in bf16 (half the memory); trained weights stay fp32 for the optimizer.
    assert seen.frozen_parts == {"vae": {(False, torch.bfloat16)}, "text_encoder": {(False, torch.bfloat16)}}
    loss = recorded(run)[0]["loss"]
    assert loss != hand.loss and loss == pytest.approx(hand.loss, rel=5e-2)


def check_gradient_checkpointing(run, hand, config, seen) -> None:
    assert seen.checkpointing == {True}  # the UNet and the trained text encoder
    check_first_step(run, hand, config, seen)  # the same numbers, recomputed instead of stored


ROWS = {  # row -> (model fixture, settings, check)
    "defaults": ("tiny_model", {}, check_first_step),
    "learning_rate": ("tiny_model", {"learning_rate": 3e-3}, check_first_step),
    "adam_weight_decay": ("tiny_model", {"adam_weight_decay": 0.3}, check_first_step),
    "seed": ("tiny_model", {"seed": 11}, check_first_step),
    "train_batch_size": ("tiny_model", {"train_batch_size": 2}, check_first_step),
    "gradient_accumulation_steps": ("tiny_model", {"gradient_accumulation_steps": 2, "max_train_steps": 2,
                                                   "class_prompt": CLASS_PROMPT}, check_first_step),
    # The crop rows watch the VAE receive each batch, so they train without the cache (it encodes each image
    # once, up front); the cache row checks that.
    "center_crop": ("tiny_model", {"center_crop": True, "train_batch_size": 3, "cache": False}, check_pixels),
    "random_flip": ("tiny_model", {"random_flip": True, "train_batch_size": 3, "cache": False}, check_pixels),
    "prior_loss_weight": ("tiny_model", {"class_prompt": CLASS_PROMPT, "prior_loss_weight": 0.4}, check_first_step),
    "num_class_images": ("tiny_model", {"class_prompt": CLASS_PROMPT, "num_class_images": 2, "train_batch_size": 3},
                         check_first_step),
    "instance_mask_dir": ("tiny_model", {"masked": True, "train_batch_size": 2}, check_first_step),
    "mask_background_weight": ("tiny_model", {"masked": True, "mask_background_weight": 0.0,
                                              "class_prompt": CLASS_PROMPT}, check_first_step),
    "offset_noise": ("tiny_model", {"offset_noise": 0.3}, check_first_step),
    "offset_noise_levels": ("tiny_model", {"offset_noise": 0.3, "offset_noise_levels": 3}, check_first_step),
    "snr_gamma": ("tiny_model", {"snr_gamma": 2.0, "train_batch_size": 3}, check_first_step),
    "v_prediction target": ("tiny_vpred_model", {"train_batch_size": 2}, check_first_step),
    "snr_gamma, v_prediction": ("tiny_vpred_model", {"snr_gamma": 2.0, "train_batch_size": 3}, check_first_step),
    "lr_scheduler": ("tiny_model", {"lr_scheduler": "cosine", "max_train_steps": 4}, check_learning_rate_schedule),
    "lr_warmup_steps": ("tiny_model", {"lr_scheduler": "linear", "lr_warmup_steps": 2, "max_train_steps": 5},
                        check_learning_rate_schedule),
    "max_grad_norm": ("tiny_model", {"max_grad_norm": 1e-3}, check_clipping),
    "max_grad_norm off": ("tiny_model", {"max_grad_norm": 0.0}, check_clipping),
    "train_text_encoder, text_encoder_learning_rate": (
        "tiny_model", {"train_text_encoder": True, "text_encoder_learning_rate": 2e-4}, check_groups),
    "token_embedding_learning_rate, identifier": (
        "tiny_model", {"train_text_encoder": True, "text_encoder_learning_rate": 2e-4,
                       "token_embedding_learning_rate": 5e-2, "identifier": "miru"}, check_groups),
    "lora_rank, lora_alpha": ("tiny_model", {"lora_rank": 3, "lora_alpha": 6.0, "learning_rate": 1e-3,
                                             "train_text_encoder": True, "train_batch_size": 2}, check_lora),
    "lora_rank, v_prediction": ("tiny_vpred_model", {"lora_rank": 2, "train_batch_size": 2}, check_lora),
    "cache": ("tiny_model", {"center_crop": True, "train_batch_size": 3, "max_train_steps": 3}, check_cache),
    "adam_epsilon": ("tiny_model", {"adam_epsilon": 1e-4}, check_first_step),
    "adam_beta1, adam_beta2": ("tiny_model", {"adam_beta1": 0.5, "adam_beta2": 0.75, "max_train_steps": 2},
                               check_betas),
    "optimizer": ("tiny_model", {"optimizer": "lion", "adam_weight_decay": 0.5}, check_lion),
    "mixed_precision bf16": ("tiny_model", {"mixed_precision": "bf16"}, check_bf16),
    "gradient_checkpointing": ("tiny_model", {"gradient_checkpointing": True, "train_text_encoder": True},
                               check_gradient_checkpointing),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_setting_has_its_effect(row, data, tmp_path, request):
    fixture, overrides, check = ROWS[row]
    model = request.getfixturevalue(fixture)
    config = settings(model, data, tmp_path / "run", **overrides)
    with observe() as seen:
        train(config)
    check(Path(config.output), hand_first_step(model, config), config, seen)


def test_every_training_setting_has_a_row():
    """A new TrainConfig field must get a row here, or be listed as one that does not change the numbers."""
    import dataclasses

    covered = {name.strip() for row in ROWS for name in row.split(",")} | {"class_prompt", "class_dir"}
    covered |= {"v_prediction target", "max_grad_norm off", "mixed_precision bf16", "snr_gamma", "defaults"}
    not_numeric = {  # where they are tested instead
        "model", "instance_dir", "instance_prompt", "output", "class_image_steps",
        "class_image_guidance", "class_image_batch_size", "class_image_scheduler",  # test_class_images.py
        "resolution",  # every row: the hand pixels are cut at the resolution
        "max_train_steps",  # the schedule rows count the optimizer steps
        "save_pipeline_at", "checkpoint_every", "keep_checkpoints", "resume", "overwrite",  # test_train.py
        "checkpoint_minutes", "on_nan",  # test_train.py (timed checkpoints; skipped updates), test_faults.py
        "report_to", "logging_dir", "tracker_project",  # test_tracking.py: what is logged, not what is computed
        "license", "revision", "variant",  # test_artifacts.py (the card), test_models.py (which weights load)
        "validation_prompt", "validation_every", "validation_seeds", "validation_sampling_steps",  # test_train.py
        "allow_pickle", "model_config", "vae",  # test_models.py
        "estimate_memory",  # test_memory.py: it stops before training
        "log_every", "save_dtype",  # test_train.py: when losses are read, the saved dtype
        "compile", "latent_cache_dir",  # test_prepare.py: compiling; latents kept on disk give the same losses
        "lora_dropout", "lora_targets",  # test_lora.py (which layers; dropout changes what is learnt)
    }
    fields = {spec.name for spec in dataclasses.fields(TrainConfig)}
    assert fields - not_numeric <= {name.split(" ")[0] for name in covered}
