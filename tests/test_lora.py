"""LoRA runs on the tiny model: only adapters learn, the saved folder loads with plain diffusers and with
`--model RUN`, resume is exact, the scale and the identifier's embeddings reach the images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from peft.tuners.lora import LoraLayer

from dreambooth.config import GenerateConfig, TrainConfig
from dreambooth.errors import UserError
from dreambooth.lora import BASE_MODEL, EMBEDDINGS, LORA_WEIGHTS
from dreambooth.models import load_pipeline, resolve_model
from dreambooth.sampling import SamplingSetting, generate, render
from dreambooth.train import train

from conftest import TINY_RESOLUTION
from test_train import _train_until, make_config

SETTING = SamplingSetting(steps=2, guidance=7.5, scheduler="ddim")
PROMPT = "a photo of miru cat"


def lora_config(model: Path, instance_dir: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(lora_rank=4, lora_alpha=8.0, train_text_encoder=True, max_train_steps=2, learning_rate=1e-2)
    values.update(overrides)
    return make_config(model, instance_dir, output, **values)


def pixels(pipeline, prompt: str = PROMPT) -> np.ndarray:
    (image,) = render(pipeline, [prompt], [0], SETTING, height=TINY_RESOLUTION, width=TINY_RESOLUTION)
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A finished LoRA run (UNet and text encoder, the identifier's embeddings at their own rate)."""
    from conftest import write_images

    root = tmp_path_factory.mktemp("lora-run")
    write_images(root / "instance", 3, seed=1)
    config = lora_config(tiny_model, root / "instance", root / "run", checkpoint_every=1, keep_checkpoints=1,
                         max_train_steps=3, token_embedding_learning_rate=5e-2, identifier="miru")
    return train(config)


def test_a_lora_run_writes_only_adapters_and_leaves_the_base_bit_identical(tiny_model, lora_run):
    assert not lora_run.pipeline.exists() and lora_run.final_model == lora_run.lora
    saved = load_file(lora_run.lora / LORA_WEIGHTS)
    assert saved and all(".lora" in key for key in saved)  # nothing but adapter weights
    assert {key.split(".")[0] for key in saved} == {"unet", "text_encoder"}
    # The checkpoint holds only what learns (adapters, the embedding table), not the frozen base weights.
    checkpoint = lora_run.checkpoint(3)  # the last step's (keep_checkpoints=1)
    unet_state = load_file(checkpoint / "model.safetensors")
    assert unet_state and all(".lora_" in key for key in unet_state)
    assert {key for key in load_file(checkpoint / "model_1.safetensors") if ".lora_" not in key} == {
        "embeddings.token_embedding.weight"}
    # Only the identifier's rows of the token-embedding table moved; the base UNet and text encoder, loaded
    # as our loader loads them for sampling, are the base model's.
    identifier_rows = load_file(lora_run.lora / EMBEDDINGS)["token_ids"]
    pipeline = load_pipeline(str(lora_run.root))
    pipeline.unload_lora_weights()
    for component in ("unet", "text_encoder"):
        state = getattr(pipeline, component).state_dict()
        for key, value in load_file(next((tiny_model / component).glob("*.safetensors"))).items():
            if key.endswith("token_embedding.weight"):
                moved = (state[key] != value).any(dim=1).nonzero().flatten()
                assert torch.equal(moved, identifier_rows)
            else:
                assert torch.equal(state[key], value), f"{component} {key} moved"
    assert json.loads((lora_run.lora / BASE_MODEL).read_text())["model"] == str(tiny_model.resolve())


def test_the_saved_lora_loads_with_plain_diffusers_and_changes_the_images(tiny_model, lora_run):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    before = pixels(base)
    base.load_lora_weights(str(lora_run.lora))
    plain = pixels(base)
    assert np.abs(plain - before).max() > 10  # the adapters change the picture
    # Our loader applies the same adapters, plus the identifier's trained embeddings.
    ours = load_pipeline(str(lora_run.root))
    assert np.array_equal(pixels(ours, "a photo of a cat"), pixels(base, "a photo of a cat"))  # no identifier
    assert np.abs(pixels(ours) - plain).max() > 1  # the identifier's embedding rows were trained


def test_identifier_embeddings_are_saved_and_move_only_its_rows(tiny_model, lora_run):
    from transformers import CLIPTextModel, CLIPTokenizer

    stored = load_file(lora_run.lora / EMBEDDINGS)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    assert stored["token_ids"].tolist() == sorted(set(tokenizer("miru", add_special_tokens=False).input_ids))
    base_rows = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").get_input_embeddings().weight
    assert not torch.equal(stored["embeddings"], base_rows[stored["token_ids"]])
    table = load_pipeline(str(lora_run.root)).text_encoder.get_input_embeddings().weight
    moved = (table != base_rows).any(dim=1).nonzero().flatten().tolist()
    assert moved == stored["token_ids"].tolist()
    ids = stored["token_ids"]
    torch.testing.assert_close(table[ids], stored["embeddings"], rtol=0, atol=1e-7)  # the trained rows
    half = load_pipeline(str(lora_run.root), lora_scale=0.5).text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(half[ids], (base_rows[ids] + stored["embeddings"]) / 2, rtol=0, atol=1e-7)


def fused_unet(model: str, scale: float) -> dict[str, torch.Tensor]:
    pipeline = load_pipeline(model, lora_scale=scale)
    pipeline.fuse_lora(components=["unet"])
    pipeline.unload_lora_weights()
    return {key: value.clone() for key, value in pipeline.unet.state_dict().items()}


def test_lora_scale_scales_the_weight_change_and_zero_is_the_base_model(tiny_model, lora_run, tmp_path):
    base = pixels(load_pipeline(str(tiny_model)))
    assert np.array_equal(pixels(load_pipeline(str(lora_run.root), lora_scale=0.0)), base)
    original = load_pipeline(str(tiny_model)).unet.state_dict()
    half, full = (fused_unet(str(lora_run.root), scale) for scale in (0.5, 1.0))
    changed = [key for key in original if not torch.equal(full[key], original[key])]
    assert any(key.endswith("to_q.weight") for key in changed)
    for key in changed:
        torch.testing.assert_close(half[key] - original[key], 0.5 * (full[key] - original[key]), rtol=1e-4,
                                   atol=1e-6)
    output = generate(GenerateConfig(model=str(lora_run.root), prompt=[PROMPT], output=str(tmp_path / "g"),
                                     steps=[2], lora_scale=0.0, height=TINY_RESOLUTION, width=TINY_RESOLUTION))
    (image,) = (output / "images").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(image), dtype=np.float32), base)  # --lora-scale reaches generate


def test_lora_resume_after_two_of_four_steps_equals_four_straight(tiny_model, instance_dir, tmp_path):
    settings = dict(max_train_steps=4, lr_scheduler="linear", random_flip=True)
    straight = train(lora_config(tiny_model, instance_dir, tmp_path / "straight", **settings))
    interrupted = lora_config(tiny_model, instance_dir, tmp_path / "resumed", checkpoint_every=2, **settings)
    _train_until(interrupted, stop_after=2)
    interrupted.resume = True
    resumed = train(interrupted)
    a, b = load_file(straight.lora / LORA_WEIGHTS), load_file(resumed.lora / LORA_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_same_seed_same_adapters_other_seed_other_adapters(tiny_model, instance_dir, tmp_path):
    runs = [train(lora_config(tiny_model, instance_dir, tmp_path / name, max_train_steps=1, seed=seed,
                              train_text_encoder=False))
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    a, b, c = (load_file(run.lora / LORA_WEIGHTS) for run in runs)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("targets, unet_layers, text_layers", [
    ("attention", {"to_q", "to_k", "to_v", "to_out"}, {"q_proj", "k_proj", "v_proj", "out_proj"}),
    ("attention+ff", {"to_q", "to_k", "to_v", "to_out", "ff"}, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                "fc2"}),
])
def test_lora_targets_choose_the_adapted_layers(tiny_model, instance_dir, tmp_path, targets, unet_layers,
                                                 text_layers):
    run = train(lora_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1, lora_targets=targets))
    saved = load_file(run.lora / LORA_WEIGHTS)
    found = {"unet": set(), "text_encoder": set()}
    for key in saved:
        part, *path = key.split(".")
        layer = next(name for name in path if name in unet_layers | text_layers | {"ff"})
        found[part].add(layer)
    assert found == {"unet": unet_layers, "text_encoder": text_layers}


def test_all_linear_adapts_more_layers_than_attention(tiny_model, instance_dir, tmp_path):
    counts = {}
    for targets in ("attention+ff", "all-linear"):
        run = train(lora_config(tiny_model, instance_dir, tmp_path / targets, max_train_steps=1,
                                train_text_encoder=False, lora_targets=targets))
        saved = load_file(run.lora / LORA_WEIGHTS)
        counts[targets] = len(saved)
        # Every adapted layer is loaded again, by our loader and by plain diffusers.
        loaded = load_pipeline(str(run.root)).unet
        adapted = {name for name, module in loaded.named_modules() if isinstance(module, LoraLayer)}
        assert adapted == {key.removeprefix("unet.").removesuffix(".lora_A.weight") for key in saved
                           if key.endswith(".lora_A.weight")}
    assert counts["all-linear"] > counts["attention+ff"]


def test_lora_dropout_changes_what_the_adapters_learn(tiny_model, instance_dir, tmp_path):
    runs = {p: train(lora_config(tiny_model, instance_dir, tmp_path / str(p), max_train_steps=2, lora_dropout=p,
                                 train_text_encoder=False))
            for p in (0.0, 0.5)}
    a, b = (load_file(run.lora / LORA_WEIGHTS) for run in runs.values())
    assert any(not torch.equal(a[key], b[key]) for key in a)


def test_default_learning_rate_depends_on_lora(tiny_model, instance_dir, tmp_path):
    full = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o")
    adapters = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", lora_rank=8)
    assert (full.learning_rate, adapters.learning_rate) == (5e-6, 1e-4)
    assert (adapters.lora_alpha, adapters.lora_dropout, adapters.lora_targets) == (8.0, 0.0, "attention")
    given = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", lora_rank=8, learning_rate=3e-4)
    assert given.learning_rate == 3e-4


@pytest.mark.parametrize("overrides, message", [
    ({"lora_rank": 0}, "--lora-rank 0: must be greater than 0"),
    ({"lora_alpha": 4.0}, "--lora-alpha needs --lora-rank"),
    ({"lora_dropout": 0.1}, "--lora-dropout needs --lora-rank"),
    ({"lora_targets": "all-linear"}, "--lora-targets needs --lora-rank"),
    ({"lora_rank": 4, "lora_dropout": 1.0}, "--lora-dropout 1.0: must be below 1"),
])
def test_bad_lora_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", **overrides)


def test_lora_scale_on_a_full_model_and_training_on_a_lora_run_are_refused(tiny_model, lora_run, instance_dir,
                                                                           tmp_path):
    with pytest.raises(UserError, match="--lora-scale 0.5: .* is not a LoRA run"):
        load_pipeline(str(tiny_model), lora_scale=0.5)
    with pytest.raises(UserError, match="is a LoRA run; train on its base model"):
        train(make_config(str(lora_run.root), instance_dir, tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_save_dtype_writes_the_adapters_and_embedding_rows_in_it(tiny_model, instance_dir, tmp_path):
    run = train(lora_config(tiny_model, instance_dir, tmp_path / "bf16", save_dtype="bf16", max_train_steps=1,
                            token_embedding_learning_rate=5e-2, identifier="miru"))
    assert {tensor.dtype for tensor in load_file(run.lora / LORA_WEIGHTS).values()} == {torch.bfloat16}
    assert load_file(run.lora / EMBEDDINGS)["embeddings"].dtype == torch.bfloat16
    pipeline = load_pipeline(resolve_model(str(run.root)))  # loads onto the fp32 base
    assert pipeline.unet.dtype == torch.float32 and pixels(pipeline).std() > 0


def test_a_lora_folder_names_its_base_model(tiny_model, lora_run):
    source = resolve_model(str(lora_run.lora))
    assert (source.location, source.lora, source.family) == (str(tiny_model), str(lora_run.lora), "sd")


def test_a_lora_folder_without_its_base_model_is_one_line(lora_run, tmp_path):
    import shutil

    shutil.copy(lora_run.lora / LORA_WEIGHTS, tmp_path / LORA_WEIGHTS)
    with pytest.raises(UserError, match="a LoRA without base_model.json, so which model it adapts is unknown"):
        resolve_model(str(tmp_path))
    (tmp_path / BASE_MODEL).write_text(json.dumps({"model": str(lora_run.root / "missing")}))
    with pytest.raises(UserError, match="its base model cannot be loaded"):
        resolve_model(str(tmp_path))


def test_under_mixed_precision_the_frozen_base_is_stored_in_half_and_the_adapters_in_fp32(tiny_model, instance_dir,
                                                                                           tmp_path):
    from dreambooth.models import load_components
    from dreambooth.prepare import make_accelerator, prepare_models

    config = lora_config(tiny_model, instance_dir, tmp_path / "run", mixed_precision="bf16")
    components = load_components(str(tiny_model))
    trained = prepare_models(components, config, make_accelerator(config))
    for name, module in trained.items():
        learning = {p.dtype for p in module.parameters() if p.requires_grad}
        frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
        assert (learning, frozen) == ({torch.float32}, {torch.bfloat16}), name
