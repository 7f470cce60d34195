"""What the trainer will see (`inspect-data`): the crops (and masks) of the first epoch on a contact sheet, a table
of the images, and warnings about them; `data_warnings` gives train the same warnings without the sheet.

The crops come from data.DreamBoothData itself (seed 0, no flip), so the sheet holds the very pixels the first
epoch trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dreambooth.config import InspectDataConfig
from dreambooth.data import Crop, DreamBoothData, Example, load_examples, load_mask, mask_paths
from dreambooth.errors import UserError
from dreambooth.files import atomic_write_text, folder_lock, move_aside
from dreambooth.png_metadata import save_png

SHEET = "contact-sheet.png"
TABLE = "inspect.md"
PREVIEW_FILES = [SHEET, TABLE]
SHEET_CLASS_IMAGES = 16  # class folders hold hundreds; the sheet shows the first of them, the table lists all
TILES_PER_ROW = 6  # at most, images and masks together

# Near-duplicates: the mean absolute difference (0-255) of two images' 16x16 thumbnails, the closer of the pair
# and the pair with one mirrored (random flips make those the same photo). Measured on the seed study's photos of
# one white cat: a copy re-saved as JPEG or at half size differs by at most 1.2, one shifted by 3% by at most 6.5,
# while the closest two different photos differ by 40. Ten catches copies and bursts, never two real shots.
NEAR_DUPLICATE = 10.0
THUMBNAIL = 16
DUPLICATE_LINES = 10
CROP_DROPS = 0.4  # a crop dropping more (wider than 5:3) is named: 3:2 camera photos (a third) are not
MASK_EMPTY, MASK_FULL = 0.01, 0.99  # the share of a photo its mask covers, below or above which it is named

# EXIF orientation -> what load_image does to show the photo upright (ImageOps.exif_transpose).
ORIENTATIONS = {2: "mirrored", 3: "turned 180°", 4: "flipped upside down", 5: "mirrored and turned 90° anticlockwise",
                6: "turned 90° clockwise", 7: "mirrored and turned 90° clockwise", 8: "turned 90° anticlockwise"}


@dataclass
class Finding:
    """A warning about one image: a few words for its row of the table, and the line printed on its own."""

    path: Path
    note: str
    line: str


def data_warnings(instance: list[Example], classes: list[Example] | None, resolution: int,
                  center_crop: bool) -> list[str]:
    """The warnings about the decoded examples (masks included) that train prints before it starts."""
    return [finding.line for finding in findings(instance, classes, resolution, center_crop) if finding.line]


def findings(instance: list[Example], classes: list[Example] | None, resolution: int,
             center_crop: bool) -> list[Finding]:
    examples = instance + (classes or [])
    found = [finding for example in examples for finding in _image_findings(example, resolution, center_crop)]
    return found + _duplicates(examples)


def _image_findings(example: Example, resolution: int, center_crop: bool) -> list[Finding]:
    path, (width, height) = example.path, example.image.size
    found = []
    if min(width, height) < resolution:
        scale = resolution / min(width, height)
        found.append(Finding(path, f"upscaled ×{scale:.2f}",
                             f"{path}: {width}x{height} is smaller than --resolution {resolution}; it is upscaled "
                             f"×{scale:.2f}, so the model learns its blur; use a larger photo"))
    dropped = 1 - min(width, height) / max(width, height)
    if dropped > CROP_DROPS:
        side = "width" if width > height else "height"
        which = "its middle" if center_crop else "a different part each step"
        found.append(Finding(path, f"crop drops {dropped:.0%}",
                             f"{path}: {width}x{height} is {max(width, height) / min(width, height):.1f}:1; the "
                             f"square crop keeps {1 - dropped:.0%} of its {side} ({which}); crop it around the "
                             "subject yourself"))
    if example.mask is not None:
        covered = float(np.asarray(example.mask, dtype=np.float64).mean()) / 255
        if covered < MASK_EMPTY or covered > MASK_FULL:
            what = ("nearly empty: the loss hardly sees this photo" if covered < MASK_EMPTY else
                    "nearly full: it masks nothing out")
            share = _share(covered)
            found.append(Finding(path, f"mask {share}", f"{path}: its mask covers {share} ({what})"))
    return found


def _share(fraction: float) -> str:
    return f"{fraction:.0%}" if MASK_EMPTY <= fraction <= MASK_FULL else f"{fraction:.1%}"


def _thumbnail(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX), dtype=np.float32)


def _duplicates(examples: list[Example]) -> list[Finding]:
    """Near-duplicate pairs (see NEAR_DUPLICATE): each image's row names its first twin, and the first
    DUPLICATE_LINES pairs get a line each (a folder of look-alikes would otherwise print thousands)."""
    if len(examples) < 2:
        return []
    thumbnails = np.stack([_thumbnail(example.image) for example in examples])
    pairs, twins = [], {}
    for i, first in enumerate(thumbnails):
        rest = thumbnails[i + 1:]
        straight = np.abs(rest - first).mean(axis=(1, 2, 3))
        mirrored = np.abs(rest - first[:, ::-1]).mean(axis=(1, 2, 3))
        for j in np.flatnonzero(np.minimum(straight, mirrored) <= NEAR_DUPLICATE):
            a, b = examples[i].path, examples[i + 1 + j].path
            pairs.append((a, b, min(straight[j], mirrored[j]), mirrored[j] < straight[j]))
            twins.setdefault(a, []).append(b.name)
            twins.setdefault(b, []).append(a.name)
    found = [Finding(path, f"near-duplicate of {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else ""),
                     "") for path, names in twins.items()]
    for a, b, distance, flipped in pairs[:DUPLICATE_LINES]:
        found.append(Finding(a, "", f"{a} and {b} are near-duplicates (16x16 thumbnails differ by {distance:.1f}/255"
                                    f"{', one mirrored' if flipped else ''}); the pair trains as one photo twice, "
                                    "keep one"))
    if len(pairs) > DUPLICATE_LINES:
        found.append(Finding(pairs[DUPLICATE_LINES][0], "", f"{len(pairs) - DUPLICATE_LINES} more near-duplicate "
                             "pairs (the inspect-data table marks every image in one)"))
    return found


def _pair_masks(instance: list[Example], folder: str) -> tuple[list[Example], list[Finding]]:
    """The examples with the masks train would accept; a finding (and no mask) for each it would refuse."""
    flag = "--instance-mask-dir"
    by_stem = mask_paths(folder, flag)
    paired, found = [], []
    for example in instance:
        path = by_stem.pop(example.path.stem, None)
        mask = load_mask(path) if path is not None else None
        if path is None:
            found.append(Finding(example.path, "no mask", f"{flag} {folder}: no mask for {example.path.name}; add "
                                 f"{example.path.stem}.png (train refuses the set without it)"))
        elif mask.size != example.image.size:
            found.append(Finding(example.path, f"mask {mask.size[0]}x{mask.size[1]}",
                                 f"{path}: the mask is {mask.size[0]}x{mask.size[1]} but {example.path.name} is "
                                 f"{example.image.size[0]}x{example.image.size[1]} (train refuses it)"))
            mask = None
        paired.append(replace(example, mask=mask))
    for path in by_stem.values():
        found.append(Finding(path, "", f"{path}: a mask for no photo in --instance-dir (train ignores it)"))
    return paired, found


def _header(path: Path) -> tuple[str, str]:
    """The file's own mode and the orientation fix its EXIF asks for."""
    with Image.open(path) as image:
        orientation = image.getexif().get(0x0112, 1)
        fix = f"EXIF {orientation}: {ORIENTATIONS[orientation]}" if orientation in ORIENTATIONS else "-"
        return image.mode, fix


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "-"


def _table(crops: list[Crop], notes: dict[Path, list[str]], default_caption: str, masks: bool) -> str:
    """A Markdown table whose columns line up in a terminal too."""
    header = ["file", "size -> resized", "mode", "orientation", "caption", *(["mask"] if masks else []), "warnings"]
    rows = [header]
    for crop in crops:
        example = crop.example
        mode, orientation = _header(example.path)
        size = f"{example.image.width}x{example.image.height} -> {crop.resized[0]}x{crop.resized[1]}"
        caption = example.prompt if len(example.prompt) <= 50 else example.prompt[:47] + "..."
        mask = [_share(np.asarray(example.mask).mean() / 255) if example.mask is not None else "none"] if masks else []
        rows.append([example.path.name, size, mode, orientation, caption or default_caption, *mask,
                     "; ".join(note for note in notes.get(example.path, []) if note)])
    rows = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["| " + " | ".join(value.ljust(width) for value, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _fit(text: str, font, width: float) -> str:
    """`text` shortened in the middle to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 1 and font.getlength(f"{text[:(keep + 1) // 2]}…{text[len(text) - keep // 2:]}") > width:
        keep -= 1
    return f"{text[:(keep + 1) // 2]}…{text[len(text) - keep // 2:]}"


@dataclass
class Section:
    """A titled part of the contact sheet: `crops` of one set (instance or class), with masks or without."""

    title: str
    name: str
    crops: list[Crop]
    masks: bool = False


def contact_sheet(sections: list[Section], resolution: int) -> tuple[Image.Image, list[dict]]:
    """Each section's crops (with its mask beside each crop) labelled with their file names; and where each tile
    lies: {"file", "set", "kind" (image or mask), "sample_id", "box"}, boxes in sheet pixels."""
    # Tiny resolutions are blown up by a whole factor (nearest neighbour: no invented pixel) to fit a label.
    scale = max(1, math.ceil(128 / resolution))
    tile, gap = resolution * scale, max(4, resolution * scale // 32)
    font = ImageFont.load_default(size=max(12, min(28, tile // 16)))
    line_h = sum(font.getmetrics()) + 4 if hasattr(font, "getmetrics") else 16
    layouts = []  # per section: item width, items per row, rows
    for section in sections:
        per_item = 2 if section.masks else 1
        rows = math.ceil(len(section.crops) / max(1, TILES_PER_ROW // per_item))
        layouts.append((per_item * tile + (per_item - 1) * gap // 2, math.ceil(len(section.crops) / rows), rows))
    width = max(max(gap + columns * (item_w + gap), round(font.getlength(section.title)) + 2 * gap)
                for section, (item_w, columns, _) in zip(sections, layouts))
    height = sum(line_h + gap + rows * (tile + line_h + gap) for *_, rows in layouts)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    cells: list[dict] = []
    y = 0
    for section, (item_w, columns, rows) in zip(sections, layouts):
        draw.text((gap, y + gap // 2), section.title, fill="black", font=font)
        y += line_h + gap
        for index, crop in enumerate(section.crops):
            left = gap + (index % columns) * (item_w + gap)
            top = y + (index // columns) * (tile + line_h + gap)
            pieces = [("image", crop.image)] + ([("mask", crop.mask)] if section.masks else [])
            for place, (kind, piece) in enumerate(pieces):
                x = left + place * (tile + gap // 2)
                if piece is None:  # a mask train would refuse: nothing to show
                    draw.rectangle((x, top, x + tile - 1, top + tile - 1), fill=(230, 230, 230))
                    draw.text((x + gap, top + gap), "no usable mask", fill="black", font=font)
                    continue
                sheet.paste(piece.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, top))
                cells.append({"file": crop.example.path.name, "set": section.name, "kind": kind,
                              "sample_id": crop.sample_id, "box": [x, top, x + tile, top + tile]})
            label = _fit(crop.example.path.name, font, item_w)
            draw.text((left + (item_w - font.getlength(label)) / 2, top + tile + 2), label, fill="black", font=font)
        y += rows * (tile + line_h + gap)
    return sheet, cells


def first_epoch_crops(instance: list[Example], classes: list[Example] | None, resolution: int, center_crop: bool,
                      masks: bool) -> tuple[list[Crop], list[Crop]]:
    """Each instance and class example's crop where the first epoch shows it (seed 0, no flip), in their order."""
    # DreamBoothData takes every mask or none: a blank one stands in where train would refuse it (not shown).
    blank = [replace(e, mask=Image.new("L", e.image.size, 0)) if masks and e.mask is None else e for e in instance]
    data = DreamBoothData(blank, classes, resolution, center_crop, random_flip=False, seed=0)
    instance_crops = [replace(crop, example=example, mask=crop.mask if example.mask is not None else None)
                      for example, crop in zip(instance, map(data.crop, data.first_sample_ids()))]
    return instance_crops, [data.crop(k, classes=True) for k in data.first_sample_ids(classes=True)]


def _claim(output: Path, config: InspectDataConfig) -> None:
    for flag, folder in (("--instance-dir", config.instance_dir), ("--class-dir", config.class_dir),
                         ("--instance-mask-dir", config.instance_mask_dir)):
        if folder and Path(folder).resolve() == output.resolve():
            raise UserError(f"--output {output} is the {flag}: the sheet would become one of its images; pick "
                            "another folder")
    if any((output / name).exists() for name in PREVIEW_FILES):
        if not config.overwrite:
            raise UserError(f"--output {output} already holds a contact sheet; pick another folder, or pass "
                            "--overwrite to move it aside")
        print(f"inspect-data: moved the earlier sheet in {output} to {move_aside(output, PREVIEW_FILES)}")


def inspect_data(config: InspectDataConfig) -> Path:
    """Write OUTPUT/contact-sheet.png and OUTPUT/inspect.md, print the table and warnings; return the sheet."""
    output, resolution = Path(config.output), config.resolution
    with folder_lock(output):
        _claim(output, config)
        instance = load_examples(config.instance_dir, "", "--instance-dir")
        found: list[Finding] = []
        if config.instance_mask_dir:
            instance, found = _pair_masks(instance, config.instance_mask_dir)
        classes = load_examples(config.class_dir, "", "--class-dir") if config.class_dir else None
        found = findings(instance, classes, resolution, config.center_crop) + found
        masks = config.instance_mask_dir is not None
        instance_crops, class_crops = first_epoch_crops(instance, classes, resolution, config.center_crop, masks)
        how = "centre crops" if config.center_crop else "random crops of the first epoch (seed 0, no flip)"
        sections = [Section(f"instance images: {how} at {resolution} px", "instance", instance_crops, masks)]
        if class_crops:
            shown = class_crops[:SHEET_CLASS_IMAGES]
            which = f"the first {len(shown)} of {len(class_crops)}" if len(shown) < len(class_crops) else len(shown)
            sections.append(Section(f"class images ({which}): {how}", "class", shown))
        sheet, cells = contact_sheet(sections, resolution)

        notes: dict[Path, list[str]] = {}
        for finding in found:
            notes.setdefault(finding.path, []).append(finding.note)
        order = {example.path: index for index, example in enumerate(instance + (classes or []))}
        lines = [f.line for f in sorted(found, key=lambda f: order.get(f.path, len(order))) if f.line]
        heading = f"{len(instance)} instance images at --resolution {resolution}, {how}"
        instance_table = _table(instance_crops, notes, "(--instance-prompt)", masks)
        class_table = _table(class_crops, notes, "(--class-prompt)", False) if class_crops else ""
        warnings = [f"{len(lines)} warning(s):", *(f"- {line}" for line in lines)] if lines else ["no warnings"]
        report = [heading, "", instance_table, ""]
        if class_table:
            report += [f"{len(class_crops)} class images", "", class_table, ""]
        save_png(sheet, output / SHEET, {"resolution": resolution, "center_crop": config.center_crop, "seed": 0,
                                         "cells": cells})
        atomic_write_text(output / TABLE, "\n".join(report + warnings) + "\n")
    printed = [heading, "", instance_table, ""]
    if class_table:
        printed += [f"{len(class_crops)} class images: their table is in {output / TABLE}", ""]
    print("\n".join(printed + warnings))
    return output / SHEET
