"""Class-image top-up: existing images are kept and counted, new ones are recorded."""

import json
import os
import signal

import pytest
from PIL import Image

import dreambooth.class_images as class_images
from dreambooth.class_images import free_indices, top_up_class_images
from dreambooth.config import ClassImagesConfig
from dreambooth.errors import UserError
from dreambooth.files import folder_lock
from dreambooth.interrupts import Stopped
from dreambooth.png_metadata import read_png_record

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
    # The same line and PNG record as `generate` writes, so `evaluate` and A1111 read a class folder alike.
    assert manifest[1] == {"file": "class-00001.png", "prompt": "a photo of a cat", "negative_prompt": "", "seed": 11,
                           "steps": 2, "guidance": 7.5, "scheduler": "dpm++", "model": str(tiny_model),
                           "height": 32, "width": 32}
    assert read_png_record(folder / "class-00001.png") == {k: v for k, v in manifest[1].items() if k != "file"}
    with Image.open(folder / "class-00001.png") as image:
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


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_stopped_top_up_continues_to_the_images_an_uninterrupted_one_makes(tiny_model, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    top_up_class_images(config_for(tiny_model, whole, 4))

    # SIGTERM while the first batch (of 2) is saved: the batch is finished, then the top-up stops.
    real_save = class_images.save_listed_image

    def save_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only asks to stop
        return real_save(*args, **kwargs)

    folder = tmp_path / "cats"
    monkeypatch.setattr(class_images, "save_listed_image", save_then_signal)
    with pytest.raises(Stopped, match=r"^stopped after 2 of the 4 class images to generate \(SIGTERM\); run the "
                                      r"same command again to generate the rest$"):
        top_up_class_images(config_for(tiny_model, folder, 4))
    monkeypatch.setattr(class_images, "save_listed_image", real_save)
    assert sorted(folder_bytes(folder)) == ["class-00000.png", "class-00001.png", "manifest.jsonl"]

    # A kill -9 leaves a partial image under a temp name: the next top-up removes it and nothing of the user's.
    (folder / ".class-00002.0123abcd.tmp.png").write_bytes(b"half a png")
    mine = {".notes.tmp": b"mine", ".class-00003.tmp.png": b"mine too"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    top_up_class_images(config_for(tiny_model, folder, 4))
    assert folder_bytes(folder) == folder_bytes(whole) | mine


def test_a_top_up_refuses_a_folder_another_process_writes(tiny_model, tmp_path):
    folder = tmp_path / "cats"
    with folder_lock(folder, "--class-dir"):  # as another top-up holding it would
        with pytest.raises(UserError, match=rf"^--class-dir {folder}: process {os.getpid()} on .* is writing it"):
            top_up_class_images(config_for(tiny_model, folder, 2), flag="--class-dir")
        assert [p.name for p in folder.iterdir()] == [".dreambooth.lock"]
        # A full folder is only read: trains sharing a class folder may start side by side. The writer's temp file
        # is live while it holds the folder, and left over once it is gone.
        write_images(folder, 2)
        (folder / ".class-00009.0123abcd.tmp.png").write_bytes(b"being written")
        assert len(top_up_class_images(config_for(tiny_model, folder, 2))) == 2
        assert (folder / ".class-00009.0123abcd.tmp.png").is_file()
    assert len(top_up_class_images(config_for(tiny_model, folder, 2))) == 2
    assert not (folder / ".class-00009.0123abcd.tmp.png").exists()


def test_new_names_never_name_anything_already_there(tmp_path):
    (tmp_path / "CLASS-00000.PNG").write_bytes(b"a user's image: the same file as class-00000.png on macOS")
    (tmp_path / "class-00002.png").mkdir()
    assert free_indices(tmp_path, 2) == [1, 3]
