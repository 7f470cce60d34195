"""The loss curve and the model card: the card is a Hub model card (metadata that huggingface_hub reads, a widget
of the run's own images) with relative paths only, and its usage snippet works from the run folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth.artifacts import (base_model_license, base_model_name, card_metadata, model_card_text, sample_prompt,
                                  smooth)
from dreambooth.checkpoints import RunPaths
from dreambooth.train import train

from conftest import write_images
from test_train import make_config

PROMPT = "a photo of miru cat"
VALIDATION = ["a photo of miru cat on the beach", "a photo of miru cat in the snow"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, RunPaths]:
    """A finished full run and a LoRA run (2 steps each), with validation images at steps 1 and 2."""
    root = tmp_path_factory.mktemp("card-runs")
    write_images(root / "instance", 3, seed=1)
    common = dict(max_train_steps=2, validation_prompt=VALIDATION, validation_every=1, validation_seeds=[0],
                  validation_sampling_steps=1)
    full = train(make_config(tiny_model, root / "instance", root / "miru", license="openrail++", **common))
    lora = train(make_config(tiny_model, root / "instance", root / "miru-lora", lora_rank=4, lora_alpha=8.0,
                             learning_rate=1e-2, **common))
    return {"full": full, "lora": lora}


def settings_of(paths: RunPaths) -> dict:
    return yaml.safe_load(paths.config.read_text())


def assert_no_absolute_path(text: str, *paths: Path) -> None:
    for path in paths:
        assert str(path) not in text and str(path.resolve()) not in text
    # Nothing that starts like a path from the root ("/tmp/...", "/home/...") outside a URL.
    assert not re.search(r"(?<![\w:/.])/(?:tmp|home|root|Users|var|mnt|work)\b", text)


def test_smooth_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_the_card_carries_hub_metadata_relative_paths_and_a_widget_of_its_own_images(runs, tiny_model):
    paths = runs["full"]
    text = paths.model_card.read_text()
    data = ModelCard.load(paths.model_card).data.to_dict()
    urls = [f"validation/step-000002/p{index}-seed0.png" for index in range(2)]
    assert data == {
        "license": "openrail++", "base_model": tiny_model.parent.name, "library_name": "diffusers",
        "pipeline_tag": "text-to-image", "tags": ["dreambooth", "text-to-image", "diffusers", "stable-diffusion"],
        "instance_prompt": PROMPT,
        "widget": [{"text": prompt, "output": {"url": url}} for prompt, url in zip(VALIDATION, urls)],
    }
    assert all((paths.root / url).is_file() for url in urls)
    assert_no_absolute_path(text, paths.root, tiny_model)
    assert "![loss](loss.png)" in text and f"![{VALIDATION[1]}]({urls[1]})" in text
    assert "| instance_prompt | a photo of miru cat |" in text and "| max_train_steps | 2 |" in text
    assert 'dreambooth generate --model . --prompt "a photo of miru cat by the sea"' in text


def test_the_usage_snippet_runs_from_the_run_folder(runs, monkeypatch):
    from diffusers import StableDiffusionPipeline

    text = runs["full"].model_card.read_text()
    (line,) = [line for line in text.splitlines() if "from_pretrained(" in line]
    monkeypatch.chdir(runs["full"].root)
    loaded = eval(line.split("=", 1)[1].split("#")[0].strip(), {"StableDiffusionPipeline": StableDiffusionPipeline})
    assert loaded.unet is not None


def test_a_card_for_the_hub_names_the_repository(runs):
    text = model_card_text(runs["full"], settings_of(runs["full"]), "me/miru")
    assert 'StableDiffusionPipeline.from_pretrained("me/miru")\n' in text
    assert "dreambooth generate --model me/miru " in text and "--model ." not in text


def test_a_lora_card(runs, tiny_model):
    paths = runs["lora"]
    text = paths.model_card.read_text()
    data = ModelCard.load(paths.model_card).data
    assert data.tags[-1] == "lora" and data.base_model == tiny_model.parent.name and data.license is None
    assert "base_model_relation" not in data.to_dict()  # only for a hub id, which the Hub can link
    assert f'from_pretrained("path/to/{tiny_model.parent.name}")' in text  # a local base: the reader's copy
    assert 'pipeline.load_lora_weights("lora")' in text and "| lora_rank | 4 |" in text
    assert_no_absolute_path(text, paths.root, tiny_model)
    on_hub = model_card_text(paths, settings_of(paths), "me/miru-lora")
    assert 'load_lora_weights("me/miru-lora")' in on_hub
    assert "dreambooth generate" not in on_hub  # its base_model.json names a folder on this machine only


def test_a_hub_base_model_is_linked_pinned_and_tagged_by_family(runs, tmp_path):
    paths = runs["lora"]
    settings = {**settings_of(paths), "model": "someone/sdxl-base", "revision": "v2", "variant": "fp16"}
    run = {"base_model": "someone/sdxl-base", "base_model_kind": "hub", "base_model_location": "someone/sdxl-base",
           "family": "sdxl"}
    data = card_metadata(paths, settings, run, [])
    assert data.tags == ["dreambooth", "text-to-image", "diffusers", "stable-diffusion-xl", "lora"]
    assert data.base_model == "someone/sdxl-base" and data.base_model_relation == "adapter"
    assert getattr(data, "widget", None) is None
    copy = RunPaths(Path(shutil.copytree(paths.root, tmp_path / "sdxl-lora")))
    copy.config.write_text(yaml.safe_dump({**settings, "_run": run}))
    text = model_card_text(copy, settings, "me/miru-xl")
    assert 'StableDiffusionXLPipeline.from_pretrained("someone/sdxl-base", revision="v2", variant="fp16")' in text
    assert "Fine-tuned from" not in text and "for [someone/sdxl-base](https://huggingface.co/someone/sdxl-base)" in text
    assert "hf download me/miru-xl --local-dir miru-xl`, then `dreambooth generate --model miru-xl " in text
    assert "| revision | v2 |\n| variant | fp16 |" in text


def test_the_license_comes_from_the_base_models_card_where_it_is_known(tmp_path, monkeypatch):
    import huggingface_hub.constants

    card = "---\nlicense: creativeml-openrail-m\n---\n# a model\n"
    folder = tmp_path / "sd15" / "pipeline"
    folder.mkdir(parents=True)
    (folder.parent / "README.md").write_text(card)  # a RUN folder's card, beside its pipeline
    settings = {"model": str(folder)}
    as_folder = {"base_model": str(folder), "base_model_kind": "folder", "base_model_location": str(folder)}
    assert base_model_license(as_folder, settings) == "creativeml-openrail-m"
    assert base_model_name(as_folder, settings) == "sd15"
    (folder.parent / "README.md").write_text("---\nlicense: [unclosed\n---\n")  # unreadable metadata: unknown
    assert base_model_license(as_folder, settings) is None
    # A hub model whose card is in the hub cache; a hub-cache folder is named by its hub id.
    snapshot = tmp_path / "hub" / "models--someone--sd15" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text(card)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    as_hub = {"base_model": "someone/sd15", "base_model_kind": "hub", "base_model_location": "someone/sd15"}
    assert base_model_license(as_hub, {"model": "someone/sd15"}) == "creativeml-openrail-m"
    assert base_model_license(as_hub, {"model": "someone/sd15", "revision": "v9"}) is None  # not cached
    in_cache = {**as_folder, "base_model": str(snapshot), "base_model_location": str(snapshot)}
    assert base_model_name(in_cache, settings) == "someone/sd15"


def test_a_samples_prompt_is_read_from_its_png_or_the_validation_prompts(tmp_path):
    settings = {"validation_prompt": ["first", "second"]}
    image = Image.new("RGB", (4, 4))
    info = PngInfo()
    info.add_text("dreambooth", json.dumps({"prompt": "from the json chunk", "seed": 0}))
    image.save(tmp_path / "p0-seed0.png", pnginfo=info)
    info = PngInfo()
    info.add_text("dreambooth", "{not json")
    image.save(tmp_path / "p1-seed3.png", pnginfo=info)
    image.save(tmp_path / "other.png")
    assert sample_prompt(tmp_path / "p0-seed0.png", settings) == "from the json chunk"
    assert sample_prompt(tmp_path / "p1-seed3.png", settings) == "second"
    assert sample_prompt(tmp_path / "other.png", settings) is None


def test_an_older_run_without_a_record_names_its_base_without_a_path(runs, tmp_path):
    copy = RunPaths(Path(shutil.copytree(runs["full"].root, tmp_path / "old")))
    settings = settings_of(copy)
    settings.pop("_run")
    copy.config.write_text(yaml.safe_dump(settings))
    text = model_card_text(copy, settings)
    assert ModelCard(text).data.base_model == Path(settings["model"]).parent.name
    assert_no_absolute_path(text, copy.root, Path(settings["model"]))
