"""SDXL through every path on a tiny SDXL pipeline: full and LoRA training with prior preservation, both
text encoders, saving, generating, and a swapped-in VAE (the conditioning itself: test_step.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dreambooth.config import GenerateConfig, TrainConfig
from dreambooth.errors import UserError
from dreambooth.lora import EMBEDDINGS, LORA_WEIGHTS
from dreambooth.models import load_pipeline
from dreambooth.sampling import generate
from dreambooth.train import train

from conftest import TINY_RESOLUTION


def sdxl_config(model: Path, root: Path, name: str, **overrides) -> TrainConfig:
    values = dict(model=str(model), instance_dir=str(root / "instance"), instance_prompt="a photo of miru cat",
                  output=str(root / name), max_train_steps=2, learning_rate=1e-3, train_text_encoder=True,
                  class_prompt="a photo of a cat", class_dir=str(root / "classes"), num_class_images=2,
                  class_image_steps=2, seed=1)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory) -> Path:
    from conftest import write_images

    root = tmp_path_factory.mktemp("sdxl")
    write_images(root / "instance", 3, size=44, seed=1)
    return root


def changed(before: Path, after: Path) -> bool:
    (a,), (b,) = before.glob("*.safetensors"), after.glob("*.safetensors")
    first, second = load_file(a), load_file(b)
    return any(not torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="module")
def full_run(tiny_sdxl_model, sdxl_root):
    return train(sdxl_config(tiny_sdxl_model, sdxl_root, "full"))


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_model, sdxl_root, full_run):  # after full_run, which makes the class images
    return train(sdxl_config(tiny_sdxl_model, sdxl_root, "lora", lora_rank=4, identifier="miru",
                             token_embedding_learning_rate=1e-2, learning_rate=1e-2,
                             validation_prompt=["a photo of miru cat"], validation_sampling_steps=2))


def test_sdxl_full_fine_tune_with_prior_preservation_trains_both_encoders_and_generates(tiny_sdxl_model, sdxl_root,
                                                                                         full_run):
    run = full_run
    assert len(list((sdxl_root / "classes").glob("*.png"))) == 2  # class images made by the SDXL base model
    assert all("prior_loss" in line for line in run.metrics.read_text().splitlines())
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert changed(tiny_sdxl_model / part, run.pipeline / part), part
    assert not changed(tiny_sdxl_model / "vae", run.pipeline / "vae")
    record = yaml.safe_load(run.config.read_text())
    assert record["resolution"] == TINY_RESOLUTION  # the model's native size: UNet sample size x VAE factor
    assert record["_run"]["family"] == "sdxl"
    output = generate(GenerateConfig(model=str(run.root), prompt=["a photo of miru cat"], steps=[2],
                                     output=str(sdxl_root / "full-samples")))
    assert len(list((output / "images").glob("*.png"))) == 1


def test_sdxl_lora_with_prior_preservation_saves_both_encoders_and_loads(tiny_sdxl_model, sdxl_root, lora_run):
    from diffusers import StableDiffusionXLPipeline

    run = lora_run
    assert len(list(run.validation_step(2).glob("*.png"))) == 2  # validation renders through both encoders
    saved = load_file(run.lora / LORA_WEIGHTS)
    assert {key.split(".")[0] for key in saved} == {"unet", "text_encoder", "text_encoder_2"}
    assert set(load_file(run.lora / EMBEDDINGS)) == {"token_ids", "embeddings", "token_ids_2", "embeddings_2"}
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    plain.load_lora_weights(str(run.lora))  # plain diffusers reads all three parts
    assert set(plain.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    ours = load_pipeline(str(run.root))
    table = ours.text_encoder_2.get_input_embeddings().weight
    base = plain.text_encoder_2.get_input_embeddings().weight
    assert (table != base).any(dim=1).nonzero().flatten().tolist() == load_file(run.lora / EMBEDDINGS)[
        "token_ids_2"].tolist()
    output = generate(GenerateConfig(model=str(run.root), prompt=["a photo of miru cat"], steps=[2],
                                     output=str(sdxl_root / "lora-samples")))
    assert len(list((output / "images").glob("*.png"))) == 1


def test_vae_of_the_same_family_is_used_and_another_familys_is_refused(tiny_sdxl_model, tiny_model, sdxl_root):
    pipeline = load_pipeline(str(tiny_sdxl_model), vae=str(tiny_sdxl_model / "vae"))
    assert pipeline.vae.config.scaling_factor == 0.13025
    with pytest.raises(UserError, match=r"--vae .*: made for another model family \(its latents are scaled by "
                                        r"0.18215, this model's by 0.13025\)"):
        load_pipeline(str(tiny_sdxl_model), vae=str(tiny_model))
    with pytest.raises(UserError, match="--vae"):
        train(sdxl_config(tiny_sdxl_model, sdxl_root, "bad-vae", vae=str(tiny_model)))
    assert not (sdxl_root / "bad-vae").exists()


def test_sdxl_runs_export_as_single_file_and_kohya(tiny_sdxl_model, sdxl_root, full_run, lora_run):
    """The SDXL runs through `dreambooth export` (the conversions themselves: test_export.py, where a wider
    second encoder lets from_single_file tell the two encoders apart; here both are 32 wide, so only the UNet,
    VAE and first encoder are compared after loading)."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    from dreambooth.cli import main
    from dreambooth.sampling import SamplingSetting, render

    full, adapters = full_run.root, lora_run.root
    single = sdxl_root / "full.safetensors"
    assert main(["export", str(full), "--format", "single-file", "--dtype", "fp32", "--output", str(single)]) == 0
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(tiny_sdxl_model))
    trained = load_pipeline(str(full))
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(trained, part).state_dict(), getattr(loaded, part).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours if "position_ids" not in key), part
    kohya = sdxl_root / "lora-kohya.safetensors"
    assert main(["export", str(adapters), "--format", "kohya", "--dtype", "fp32", "--output", str(kohya)]) == 0
    setting = SamplingSetting(steps=2, guidance=5.0, scheduler="euler")
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    plain.load_lora_weights(str(sdxl_root), weight_name=kohya.name)
    # The run's own loader adds the trained embedding rows, which a kohya file cannot hold: compare without them.
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    ours.load_lora_weights(str(adapters / "lora"))
    images = [np.asarray(render(p, ["a photo of a cat"], [0], setting)[0], dtype=np.float32) for p in (plain, ours)]
    assert np.abs(images[0] - images[1]).max() <= 1
