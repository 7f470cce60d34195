"""Data: odd-but-valid images decode, broken ones are named, transforms and step-indexed batches are exact."""

from __future__ import annotations

import codecs
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import write_images
from dreambooth.data import (
    DreamBoothData,
    Example,
    caption_for,
    list_images,
    load_examples,
    load_image,
    load_masks,
    to_tensor,
)
from dreambooth.errors import UserError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pixel(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image)[y, x].astype(int)


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def examples(count: int, tag: str, size: int = 16) -> list[Example]:
    """Examples with unique prompts and unique grey levels, so a batch reveals which example it drew."""
    return [
        Example(Path(f"{tag}{i}.png"), f"{tag} {i}", solid((10 * i,) * 3, (size, size))) for i in range(count)
    ]


def asymmetric(size: int = 16) -> Image.Image:
    """Left half red, right half blue: any flip or crop offset shows in the pixels."""
    pixels = np.zeros((size, size * 2, 3), dtype=np.uint8)
    pixels[:, :size] = RED
    pixels[:, size:] = BLUE
    pixels[:, size - 2 : size + 2] = GREEN
    return Image.fromarray(pixels)


# --- odd but valid images -------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    image = load_image(path)
    assert image.mode == "RGB"
    r, g, b = pixel(image, 8, 8)
    assert r > 230 and g < 25 and b < 25


def test_16bit_grayscale_scales_instead_of_clipping(tmp_path):
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, :4] = 0
    values[:, 4:12] = 32768  # mid-grey in 16 bits
    values[:, 12:] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # the file really is 16-bit
    image = load_image(path)
    assert image.mode == "RGB"
    assert list(pixel(image, 0, 0)) == [0, 0, 0]
    assert all(abs(v - 128) <= 1 for v in pixel(image, 8, 8))  # clipping would give 255
    assert list(pixel(image, 15, 0)) == [255, 255, 255]


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 8), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and list(pixel(image, 3, 3)) == [77, 77, 77]


def test_palette_with_transparency_composites_over_white(tmp_path):
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([0, 0, 0] + list(RED) + [0] * (256 * 3 - 6))
    palette_image.paste(0, (0, 0, 4, 8))  # left half: index 0, black, made transparent below
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)
    image = load_image(path)
    assert image.mode == "RGB"
    assert list(pixel(image, 1, 1)) == list(WHITE)  # transparent black shows as white, not black
    assert list(pixel(image, 6, 1)) == list(RED)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_over_white(tmp_path, mode):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((0, 0, 0, 255), (4, 0, 8, 8))  # right half opaque black
    path = tmp_path / f"alpha-{mode}.png"
    rgba.convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert list(pixel(image, 1, 1)) == list(WHITE)
    assert list(pixel(image, 6, 1)) == [0, 0, 0]


def test_half_transparent_pixel_blends_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(path)
    r, g, b = pixel(load_image(path), 1, 1)
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, red left, blue right; orientation 6 = "rotate 90 degrees clockwise to view".
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = RED
    stored[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (20, 40)  # now portrait
    top, bottom = pixel(image, 10, 5), pixel(image, 10, 35)
    assert top[0] > 200 and top[2] < 50  # clockwise turn moves the left (red) side to the top
    assert bottom[2] > 200 and bottom[0] < 50


def test_small_image_is_upscaled(tmp_path):
    path = tmp_path / "tiny.png"
    solid(GREEN, (10, 20)).save(path)
    tensor = to_tensor(load_image(path), 32, center_crop=True, flip=False, generator=torch.Generator())
    assert tensor.shape == (3, 32, 32)
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(tensor, expected, atol=0.02)


def test_loaded_image_is_detached_from_its_file(tmp_path):
    path = tmp_path / "plain.png"
    solid(RED).save(path)
    image = load_image(path)
    path.unlink()
    assert list(pixel(image, 2, 2)) == list(RED)


# --- broken images and folders --------------------------------------------------------------------


def test_truncated_jpeg_is_named(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "img3.jpg"
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="img3.jpg: cannot read"):
        load_image(path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the fix must not be a global switch


def test_image_over_twice_the_pixel_limit_is_named_with_its_size_not_called_truncated(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    solid(RED, (40, 30)).save(path)  # 1,200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL refuses above 2x: 1,000
    with pytest.raises(UserError) as caught:
        load_examples(tmp_path, "a photo of miru cat", "--instance-dir")
    message = str(caught.value)
    assert message.startswith(f"{path}: 1,200 pixels, more than the 1,000 PIL decodes")
    assert "save the image smaller" in message and "no setting" in message and "truncated" not in message
    assert "\n" not in message


def test_image_between_one_and_two_times_the_pixel_limit_loads_without_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    solid(RED, (40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1x and still decodes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
    assert image.size == (40, 30) and not caught


def test_mask_over_the_pixel_limit_is_named_as_a_mask(tmp_path, monkeypatch):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), masks.mkdir()
    solid(RED, (40, 30)).save(photos / "a.png")
    Image.new("L", (40, 30), 255).save(masks / "a.png")
    photo = load_examples(photos, "p", "--instance-dir")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(UserError, match=r"masks/a.png: 1,200 pixels.*save the mask smaller"):
        load_masks(photo, masks, "--instance-mask-dir")


def test_text_renamed_png_is_named_by_load_examples(instance_dir):
    (instance_dir / "notes.png").write_text("this is not an image\n")
    with pytest.raises(UserError, match="notes.png: cannot read"):
        load_examples(instance_dir, "a photo of miru cat", "--instance-dir")


def test_missing_folder_names_flag(tmp_path):
    with pytest.raises(UserError, match="--instance-dir .*not found"):
        list_images(tmp_path / "nope", "--instance-dir")


def test_file_instead_of_folder_names_flag(tmp_path):
    path = tmp_path / "photo.png"
    solid(RED).save(path)
    with pytest.raises(UserError, match="--instance-dir .*not a folder"):
        list_images(path, "--instance-dir")


def test_folder_without_images_names_flag(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "caption.txt").write_text("a caption")
    (folder / "._hidden.jpg").write_bytes(b"resource fork")
    write_images(folder / "nested", 1)
    with pytest.raises(UserError, match="--class-dir .*no images"):
        list_images(folder, "--class-dir")


def test_list_images_is_sorted_and_skips_non_images(instance_dir):
    solid(RED).save(instance_dir / "UPPER.JPG", format="JPEG")
    (instance_dir / "img00.txt").write_text("caption")
    (instance_dir / ".hidden.png").write_bytes(b"x")
    write_images(instance_dir / "sub", 1)
    names = [p.name for p in list_images(instance_dir, "--instance-dir")]
    assert names == ["UPPER.JPG", "img00.png", "img01.png", "img02.png"]


# --- captions and examples ------------------------------------------------------------------------


def test_caption_txt_overrides_prompt(instance_dir):
    images = list_images(instance_dir, "--instance-dir")
    images[0].with_suffix(".txt").write_text("  a photo of miru cat on a sofa\n")
    images[1].with_suffix(".txt").write_text("\n  \n")
    assert caption_for(images[0], "default") == "a photo of miru cat on a sofa"
    assert caption_for(images[1], "default") == "default"  # empty caption file
    assert caption_for(images[2], "default") == "default"  # no caption file
    loaded = load_examples(instance_dir, "default", "--instance-dir")
    assert [e.prompt for e in loaded] == ["a photo of miru cat on a sofa", "default", "default"]
    assert all(e.image.mode == "RGB" for e in loaded)


@pytest.mark.parametrize("raw, where", [
    ("a photo of miru in a café".encode("latin-1"), r"byte 25 is 0xe9\)"),
    (codecs.BOM_UTF8 + "café".encode("latin-1"), r"byte 7 is 0xe9\)"),  # counted in the file, BOM included
    ("café".encode("utf-16"), r"byte 1 is 0xff, it is UTF-16\)"),
    (b"\xff\xfe\x00bad", r"byte 1 is 0xff, it is UTF-16\)"),
])
def test_caption_that_is_not_utf8_is_one_line_naming_the_file_and_byte(instance_dir, raw, where):
    images = list_images(instance_dir, "--instance-dir")
    caption = images[1].with_suffix(".txt")
    caption.write_bytes(raw)
    with pytest.raises(UserError, match=rf"^{re.escape(str(caption))}: not UTF-8 text \({where}; save it as UTF-8 or "
                                        "remove it$"):
        load_examples(instance_dir, "a photo of miru cat", "--instance-dir")


def test_caption_with_a_utf8_bom_reads_without_it(instance_dir):
    images = list_images(instance_dir, "--instance-dir")
    images[0].with_suffix(".txt").write_bytes(codecs.BOM_UTF8 + "a photo of miru in a café".encode())
    assert caption_for(images[0], "default") == "a photo of miru in a café"


def test_load_examples_limit_takes_first_by_name(tmp_path):
    write_images(tmp_path / "class", 5)
    loaded = load_examples(tmp_path / "class", "a photo of a cat", "--class-dir", limit=2)
    assert [e.path.name for e in loaded] == ["img00.png", "img01.png"]
    assert [e.path.name for e in load_examples(tmp_path / "class", "p", "--class-dir", limit=1)] == ["img00.png"]
    assert len(load_examples(tmp_path / "class", "p", "--class-dir", limit=9)) == 5
    with pytest.raises(ValueError, match="limit"):
        load_examples(tmp_path / "class", "p", "--class-dir", limit=0)


# --- transforms -----------------------------------------------------------------------------------


def test_to_tensor_range_shape_and_dtype():
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    tensor = to_tensor(Image.fromarray(pixels), 24, center_crop=True, flip=False, generator=torch.Generator())
    assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0  # black and white map to the ends


def test_large_image_is_downscaled_to_short_side():
    tensor = to_tensor(solid(BLUE, (200, 100)), 16, center_crop=False, flip=False, generator=torch.Generator())
    assert tensor.shape == (3, 16, 16)


def test_center_crop_takes_the_centre():
    # 60 x 20 at resolution 20: no resize, and only the middle third is green.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20], pixels[:, 20:40], pixels[:, 40:] = RED, GREEN, BLUE
    image = Image.fromarray(pixels)
    tensor = to_tensor(image, 20, center_crop=True, flip=False, generator=torch.Generator())
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 20, 20)
    assert torch.equal(tensor, expected)


def test_random_crop_follows_the_generator():
    image = asymmetric()
    crops = [to_tensor(image, 16, False, False, torch.Generator().manual_seed(s)) for s in range(8)]
    again = to_tensor(image, 16, False, False, torch.Generator().manual_seed(3))
    assert torch.equal(crops[3], again)
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 1  # offsets really vary with the seed


def test_flip_mirrors_horizontally():
    image = asymmetric()
    plain = to_tensor(image, 16, True, False, torch.Generator())
    flipped = to_tensor(image, 16, True, True, torch.Generator())
    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain.flip(-1))


# --- step-indexed batches -------------------------------------------------------------------------


def order(data: DreamBoothData, ids) -> list[str]:
    return data.batch(list(ids))["prompts"]


def test_batch_is_deterministic_and_seed_dependent():
    a = DreamBoothData(examples(8, "inst"), None, 16, center_crop=False, random_flip=True, seed=0)
    b = DreamBoothData(examples(8, "inst"), None, 16, center_crop=False, random_flip=True, seed=0)
    c = DreamBoothData(examples(8, "inst"), None, 16, center_crop=False, random_flip=True, seed=1)
    first, second = a.batch([0, 1, 2, 3]), b.batch([0, 1, 2, 3])
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert first["prompts"] == second["prompts"]
    assert order(a, range(8)) != order(c, range(8))


def test_each_epoch_visits_every_instance_once():
    data = DreamBoothData(examples(5, "inst"), None, 16, center_crop=True, random_flip=False, seed=7)
    everyone = sorted(f"inst {i}" for i in range(5))
    epochs = [order(data, range(5 * e, 5 * e + 5)) for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == everyone
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled each epoch


def test_instance_examples_first_then_class_examples():
    data = DreamBoothData(examples(3, "inst"), examples(7, "cls"), 16, True, False, seed=0)
    assert (data.num_instance, data.num_class) == (3, 7)
    batch = data.batch([0, 1])
    assert batch["num_instance"] == 2
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert [p.split()[0] for p in batch["prompts"]] == ["inst", "inst", "cls", "cls"]
    # The pixels belong to the prompt beside them: example i is a solid grey of level 10 * i.
    for row, prompt in zip(batch["pixel_values"], batch["prompts"]):
        level = 10 * int(prompt.split()[1])
        assert torch.allclose(row, torch.full_like(row, level / 127.5 - 1.0))
    class_epoch = order(data, range(7))[7:]
    assert sorted(class_epoch) == sorted(f"cls {i}" for i in range(7))  # classes walk their own epochs


def test_no_class_examples_gives_instance_only_batch():
    data = DreamBoothData(examples(3, "inst"), None, 16, True, False, seed=0)
    batch = data.batch([0, 1])
    assert data.num_class == 0 and batch["pixel_values"].shape[0] == 2 == batch["num_instance"]


def test_batch_of_two_equals_two_batches_of_one():
    instance = [Example(Path(f"a{i}.png"), f"inst {i}", asymmetric(20)) for i in range(3)]
    classes = [Example(Path(f"c{i}.png"), f"cls {i}", asymmetric(24)) for i in range(4)]
    data = DreamBoothData(instance, classes, 16, center_crop=False, random_flip=True, seed=3)
    pair, four, five = data.batch([4, 5]), data.batch([4]), data.batch([5])
    four_px, five_px = four["pixel_values"], five["pixel_values"]
    expected = torch.cat([four_px[:1], five_px[:1], four_px[1:], five_px[1:]])  # instances, then classes
    assert torch.equal(pair["pixel_values"], expected)
    assert pair["prompts"] == [four["prompts"][0], five["prompts"][0], four["prompts"][1], five["prompts"][1]]


def test_random_flip_flips_about_half_and_only_when_asked():
    image = asymmetric(16)  # short side 16 at resolution 16 with center crop: only the flip can differ
    flipped_view = to_tensor(image, 16, True, True, torch.Generator())
    with_flip = DreamBoothData([Example(Path("a.png"), "a", image)], None, 16, True, True, seed=0)
    without = DreamBoothData([Example(Path("a.png"), "a", image)], None, 16, True, False, seed=0)
    flips = [torch.equal(with_flip.batch([k])["pixel_values"][0], flipped_view) for k in range(40)]
    assert 8 <= sum(flips) <= 32
    assert not any(torch.equal(without.batch([k])["pixel_values"][0], flipped_view) for k in range(40))


def test_batch_matches_to_tensor_of_the_original_image():
    image = solid(RED, (30, 50))
    image.paste(GREEN, (5, 10, 25, 40))
    data = DreamBoothData([Example(Path("a.png"), "a", image)], None, 16, True, False, seed=0)
    direct = to_tensor(image, 16, True, False, torch.Generator())
    assert torch.equal(data.batch([0])["pixel_values"][0], direct)


# --- masks ---------------------------------------------------------------------------------------------


def left_half_mask(size: int = 16) -> Image.Image:
    """White exactly over asymmetric()'s red pixels (its left half short of the green band), black elsewhere."""
    pixels = np.zeros((size, size * 2), dtype=np.uint8)
    pixels[:, : size - 2] = 255
    return Image.fromarray(pixels, mode="L")


def test_masks_are_cut_with_the_same_crop_and_flip_as_their_photo():
    # 16x32 at resolution 16: no resize blurs the edges, and random crops slide over the width.
    data = DreamBoothData([Example(Path("a.png"), "a", asymmetric(16), mask=left_half_mask(16))],
                          examples(2, "cls", 24), 16, center_crop=False, random_flip=True, seed=5)
    seen_flipped = seen_plain = False
    for k in range(12):
        batch = data.batch([k])
        red = (batch["pixel_values"][0, 0] > 0.9) & (batch["pixel_values"][0, 2] < -0.9)
        mask = batch["masks"][0, 0]
        assert torch.equal(mask == 1.0, red)  # the mask stays on the red pixels through every crop and flip
        seen_flipped |= bool(red[:, -1].all())
        seen_plain |= bool(red[:, 0].all())
        assert torch.equal(batch["masks"][1], torch.ones(1, 16, 16))  # class examples are learned whole
    assert seen_flipped and seen_plain


def test_crop_is_the_batch_as_8_bit_images_and_first_sample_ids_are_the_first_epoch():
    """crop(k) cuts what batch([k]) cuts, flips included (inspect-data shows these), and first_sample_ids gives
    each example's place in the first epoch."""
    instance = [Example(Path(f"a{i}.png"), f"a {i}", asymmetric(16 + 4 * i), mask=left_half_mask(16 + 4 * i))
                for i in range(3)]
    data = DreamBoothData(instance, examples(4, "cls", 24), 16, center_crop=False, random_flip=True, seed=3)
    flips = set()
    for k in range(8):
        batch = data.batch([k])
        for place, classes in ((0, False), (1, True)):
            crop = data.crop(k, classes=classes)
            assert crop.example.prompt == batch["prompts"][place] and crop.sample_id == k
            pixels = torch.from_numpy(np.array(crop.image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
            assert torch.equal(pixels, batch["pixel_values"][place])
            flips.add(crop.flip)
        mask = torch.from_numpy(np.array(data.crop(k).mask, dtype=np.float32)) / 255.0
        assert torch.equal(mask, batch["masks"][0, 0])
    assert flips == {False, True}
    for classes, count in ((False, 3), (True, 4)):
        ids = data.first_sample_ids(classes=classes)
        assert sorted(ids) == list(range(count))
        assert [data.crop(k, classes=classes).example for k in ids] == (data.classes if classes else data.instance)


def test_masks_do_not_change_the_pixels_or_the_order():
    image = asymmetric(20)
    plain = DreamBoothData([Example(Path("a.png"), "a", image)], None, 16, False, True, seed=2)
    masked = DreamBoothData([Example(Path("a.png"), "a", image, mask=left_half_mask(20))], None, 16, False, True,
                            seed=2)
    assert "masks" not in plain.batch([0])
    for k in range(5):
        assert torch.equal(plain.batch([k])["pixel_values"], masked.batch([k])["pixel_values"])


def test_load_masks_pairs_by_name_and_reads_alpha_or_brightness(tmp_path):
    photos = load_examples(write_images(tmp_path / "photos", 2, size=20)[0].parent, "a photo", "--instance-dir")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (20, 20), 255).save(masks / "img00.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(masks / "img01.png")  # black but fully transparent
    loaded = load_masks(photos, masks, "--instance-mask-dir")
    assert [e.path.name for e in loaded] == ["img00.png", "img01.png"]
    assert np.asarray(loaded[0].mask).min() == 255
    assert np.asarray(loaded[1].mask).max() == 0  # transparency, not the black colour, says "background"


def test_a_missing_or_misfit_mask_is_named(tmp_path):
    photos = load_examples(write_images(tmp_path / "photos", 2, size=20)[0].parent, "a photo", "--instance-dir")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (20, 20), 255).save(masks / "img00.png")
    with pytest.raises(UserError, match=r"--instance-mask-dir .*no mask for img01.png; add img01.png"):
        load_masks(photos, masks, "--instance-mask-dir")
    Image.new("L", (10, 20), 255).save(masks / "img01.png")
    with pytest.raises(UserError, match=r"img01.png: the mask is 10x20 but img01.png is 20x20"):
        load_masks(photos, masks, "--instance-mask-dir")
