"""inspect-data: odd images give their warnings and only those, the sheet holds the trainer's very crops and masks,
and an earlier sheet is kept unless --overwrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.cli import main
from dreambooth.config import InspectDataConfig
from dreambooth.data import DreamBoothData, Example, load_examples, load_masks
from dreambooth.errors import UserError
from dreambooth.png_metadata import read_png_record
from dreambooth.preview import data_warnings, inspect_data

RESOLUTION = 64


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Coloured blocks: any two seeds give clearly different pictures, and any crop shows where it was cut."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.BILINEAR)


def mask(size: tuple[int, int], share: float) -> Image.Image:
    """White over the left `share` of the width."""
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[:, : round(size[0] * share)] = 255
    return Image.fromarray(pixels, mode="L")


@pytest.fixture
def odd(tmp_path) -> tuple[Path, Path]:
    """A photo and its re-saved smaller copy, a small greyscale photo, an EXIF-rotated one and a panorama; masks
    that fit, are full, are nearly empty, are missing, have the wrong size, or belong to no photo."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    original = photo((96, 96), 1)
    original.save(photos / "a-photo.png")
    original.resize((80, 80), Image.Resampling.LANCZOS).save(photos / "b-copy.jpg", quality=90)
    photo((40, 48), 2).convert("L").save(photos / "c-small.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120 wide, shown 80 wide and 120 high
    photo((120, 80), 3).save(photos / "d-rotated.jpg", exif=exif.tobytes(), quality=90)
    photo((320, 80), 4).save(photos / "e-panorama.png")
    (photos / "a-photo.txt").write_text("a photo of sks dog\n")
    mask((96, 96), 0.5).save(masks / "a-photo.png")
    mask((80, 80), 1.0).save(masks / "b-copy.png")
    empty = mask((80, 120), 0.0)
    empty.putpixel((3, 3), 255)
    empty.save(masks / "d-rotated.png")
    mask((40, 40), 0.5).save(masks / "e-panorama.png")
    mask((64, 64), 0.5).save(masks / "zzz-stray.png")
    return photos, masks


def test_odd_images_give_their_warnings_and_no_others(odd, tmp_path, capsys):
    photos, masks = odd
    config = InspectDataConfig(instance_dir=str(photos), instance_mask_dir=str(masks), output=str(tmp_path / "out"),
                               resolution=RESOLUTION)
    assert inspect_data(config) == tmp_path / "out" / "contact-sheet.png"
    printed = capsys.readouterr().out
    table = (tmp_path / "out" / "inspect.md").read_text()
    assert printed.strip() == table.strip()  # no class images: the file is what was printed

    expected = [
        f"{photos / 'a-photo.png'} and {photos / 'b-copy.jpg'} are near-duplicates",
        f"{photos / 'b-copy.jpg'}: its mask covers 100.0% (nearly full",
        f"{photos / 'c-small.png'}: 40x48 is smaller than --resolution 64; it is upscaled ×1.60",
        f"--instance-mask-dir {masks}: no mask for c-small.png",
        f"{photos / 'd-rotated.jpg'}: its mask covers 0.0% (nearly empty",
        f"{photos / 'e-panorama.png'}: 320x80 is 4.0:1; the square crop keeps 25% of its width",
        f"{masks / 'e-panorama.png'}: the mask is 40x40 but e-panorama.png is 320x80",
        f"{masks / 'zzz-stray.png'}: a mask for no photo",
    ]
    warnings = [line[2:] for line in table.splitlines() if line.startswith("- ")]
    assert len(warnings) == len(expected), warnings
    for line, start in zip(warnings, expected):
        assert line.startswith(start), (line, start)
    assert f"{len(expected)} warning(s):" in table

    rows = {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                              for line in table.splitlines() if line.startswith("| "))}
    size, mode, orientation, caption, share, notes = rows["d-rotated.jpg"]
    assert (size, mode, orientation) == ("80x120 -> 64x96", "RGB", "EXIF 6: turned 90° clockwise")
    assert notes == "mask 0.0%"
    assert rows["a-photo.png"][3:] == ["a photo of sks dog", "50%", "near-duplicate of b-copy.jpg"]
    assert rows["c-small.png"][:2] == ["40x48 -> 64x77", "L"]


def test_data_warnings_are_train_s_lines_for_its_decoded_examples(odd):
    photos, _ = odd
    lines = data_warnings(load_examples(photos, "a photo", "--instance-dir"), None, RESOLUTION, center_crop=True)
    assert [line.split(":")[0].split(" and ")[0] for line in lines] == [
        str(photos / "c-small.png"), str(photos / "e-panorama.png"), str(photos / "a-photo.png")]
    assert "(its middle)" in lines[1]


def test_a_folder_of_look_alikes_gives_ten_pair_lines_and_a_count():
    copies = [Example(Path(f"c{i:02d}.png"), "a cat", photo((64, 64), 5)) for i in range(13)]
    lines = data_warnings([], copies, RESOLUTION, center_crop=False)
    assert len(lines) == 11 and lines[-1].startswith(f"{13 * 12 // 2 - 10} more near-duplicate pairs")
    assert lines[0].startswith("c00.png and c01.png are near-duplicates (16x16 thumbnails differ by 0.0/255)")


@pytest.fixture
def clean(tmp_path) -> tuple[Path, Path, Path]:
    """Photos of three shapes with fitting masks and captions naming them; two class images."""
    photos, masks, classes = tmp_path / "photos", tmp_path / "masks", tmp_path / "classes"
    for folder in (photos, masks, classes):
        folder.mkdir()
    for index, size in enumerate([(100, 70), (64, 64), (90, 150)]):
        photo(size, 10 + index).save(photos / f"p{index}.png")
        (photos / f"p{index}.txt").write_text(f"caption of p{index}")
        mask(size, 0.3 + 0.2 * index).save(masks / f"p{index}.png")
    for index, size in enumerate([(64, 80), (72, 72)]):
        photo(size, 20 + index).save(classes / f"c{index}.png")
        (classes / f"c{index}.txt").write_text(f"caption of c{index}")
    return photos, masks, classes


@pytest.mark.parametrize("center_crop", [False, True])
def test_the_sheet_holds_the_trainers_crops_and_masks_pixel_for_pixel(clean, tmp_path, center_crop):
    photos, masks, classes = clean
    config = InspectDataConfig(instance_dir=str(photos), instance_mask_dir=str(masks), class_dir=str(classes),
                               output=str(tmp_path / "out"), resolution=RESOLUTION, center_crop=center_crop)
    sheet_path = inspect_data(config)
    cells = read_png_record(sheet_path)["cells"]
    with Image.open(sheet_path) as sheet:
        sheet = sheet.convert("RGB")

    # The data as train builds it (train.py step 2), at the default seed and without flips.
    instance = load_masks(load_examples(photos, "x", "--instance-dir"), masks, "--instance-mask-dir")
    data = DreamBoothData(instance, load_examples(classes, "y", "--class-dir"), RESOLUTION, center_crop,
                          random_flip=False, seed=0)
    assert sorted((c["set"], c["kind"], c["file"]) for c in cells) == sorted(
        [("instance", kind, f"p{i}.png") for i in range(3) for kind in ("image", "mask")]
        + [("class", "image", f"c{i}.png") for i in range(2)])
    for cell in cells:
        # The first epoch: sample ids 0..n-1 of each set.
        count = 3 if cell["set"] == "instance" else 2
        assert 0 <= cell["sample_id"] < count
        batch = data.batch([cell["sample_id"]])
        place = 0 if cell["set"] == "instance" else 1  # a batch holds the instance example, then the class one
        assert batch["prompts"][place] == f"caption of {cell['file'][:-4]}"  # the label names the image shown
        left, top, right, bottom = cell["box"]
        scale = (right - left) // RESOLUTION
        shown = np.asarray(sheet.crop(cell["box"]))[::scale, ::scale]
        if cell["kind"] == "image":
            trained = ((batch["pixel_values"][place] + 1) * 127.5).round().to(dtype=int).permute(1, 2, 0).numpy()
        else:
            trained = (batch["masks"][place, 0] * 255).round().to(dtype=int).numpy()[..., None].repeat(3, axis=2)
        assert np.array_equal(shown, trained), cell


def test_an_earlier_sheet_is_kept_unless_overwrite_and_the_output_is_no_input(clean, tmp_path):
    photos, _, _ = clean
    output = tmp_path / "out"
    config = InspectDataConfig(instance_dir=str(photos), output=str(output), resolution=RESOLUTION)
    inspect_data(config)
    first = (output / "contact-sheet.png").read_bytes()
    with pytest.raises(UserError, match=r"--output .* already holds a contact sheet.*--overwrite"):
        inspect_data(config)
    inspect_data(InspectDataConfig(instance_dir=str(photos), output=str(output), resolution=RESOLUTION,
                                   center_crop=True, overwrite=True))
    (aside,) = output.glob("replaced-*")
    assert (aside / "contact-sheet.png").read_bytes() == first and (aside / "inspect.md").is_file()
    assert (output / "contact-sheet.png").read_bytes() != first
    with pytest.raises(UserError, match="is the --instance-dir"):
        inspect_data(InspectDataConfig(instance_dir=str(photos), output=str(photos), resolution=RESOLUTION))
    assert sorted(p.name for p in photos.iterdir()) == ["p0.png", "p0.txt", "p1.png", "p1.txt", "p2.png", "p2.txt"]


def test_the_command_prints_the_table_and_the_sheet_and_a_refusal_is_one_line(clean, tmp_path, capsys):
    photos, _, _ = clean
    argv = ["inspect-data", "--instance-dir", str(photos), "--output", str(tmp_path / "out"), "--resolution", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| p0.png " in out and out.endswith(f"done: {tmp_path / 'out' / 'contact-sheet.png'}\n")
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
