"""Class-image top-up: existing images are kept and counted, new ones are recorded."""

import json

from PIL import Image

from dreambooth.class_images import top_up_class_images
from dreambooth.config import ClassImagesConfig

from conftest import write_images


def config_for(model, folder, num_images):
    return ClassImagesConfig(model=str(model), prompt="a photo of a cat", output=str(folder), num_images=num_images,
                             steps=2, batch_size=2, seed=10)


def test_top_up_keeps_existing_files_and_records_new_ones(tiny_model, tmp_path):
    folder = tmp_path / "cats"
    (mine,) = write_images(folder, 1, prefix="mine")
    before = mine.read_bytes()
    images = top_up_class_images(config_for(tiny_model, folder, 4))
    assert len(images) == 4 and mine.read_bytes() == before
    manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [m["file"] for m in manifest] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert [m["seed"] for m in manifest] == [10, 11, 12]
    # The same line and PNG text as `generate` writes, so `evaluate` and A1111 read a class folder alike.
    assert manifest[1] == {"file": "class-00001.png", "prompt": "a photo of a cat", "negative_prompt": "", "seed": 11,
                           "steps": 2, "guidance": 7.5, "scheduler": "dpm++", "model": str(tiny_model),
                           "height": 32, "width": 32}
    with Image.open(folder / "class-00001.png") as image:
        assert {key: image.text[key] for key in manifest[1] if key != "file"} == {
            key: str(value) for key, value in manifest[1].items() if key != "file"}
        assert "Seed: 11" in image.text["parameters"]


def test_a_second_top_up_fills_gaps_without_repeating(tiny_model, tmp_path):
    folder = tmp_path / "cats"
    top_up_class_images(config_for(tiny_model, folder, 2))
    (folder / "class-00000.png").unlink()
    generated = (folder / "class-00001.png").read_bytes()
    top_up_class_images(config_for(tiny_model, folder, 3))
    assert sorted(p.name for p in folder.glob("*.png")) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert (folder / "class-00001.png").read_bytes() == generated


def test_full_folder_loads_no_model(tmp_path):
    folder = tmp_path / "cats"
    write_images(folder, 3)
    # A model that does not exist proves nothing was loaded.
    images = top_up_class_images(config_for(tmp_path / "no-model", folder, 2))
    assert len(images) == 3
