"""Instance and class images: finding, decoding, captions, masks, transforms and step-indexed batches.

No models and no tokenizer live here: prompts stay strings and the trainer encodes them. Images are
decoded once, up front, so a broken file stops the run before any GPU time is spent.
"""

from __future__ import annotations

import codecs
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dreambooth import seeds
from dreambooth.errors import UserError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})

# The four random streams, each seeded by seeds.mix(seed, stream, epoch or sample id), so any sample's
# order and augmentation can be recomputed from (seed, sample id) alone.
_INSTANCE_ORDER, _INSTANCE_AUGMENT, _CLASS_ORDER, _CLASS_AUGMENT = 0, 1, 2, 3


def list_images(folder: str | Path, flag: str) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; a UserError naming `flag` if there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{flag} {folder}: folder not found; check the path")
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: this is a file, not a folder; pass the folder that holds the images")
    # Hidden files are skipped because macOS copies leave "._photo.jpg" resource forks that are not images.
    images = sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not images:
        kinds = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise UserError(f"{flag} {folder}: no images ({kinds}) in this folder; put the images directly in it")
    return images


def load_image(path: Path) -> Image.Image:
    """Decode `path` fully into an RGB image with EXIF orientation applied; a UserError naming it if unreadable."""
    return _decode(path, "image", _to_rgb)


def _decode(path: Path, what: str, convert) -> Image.Image:
    """`convert` of the fully decoded, EXIF-oriented image at `path`, detached from the file."""
    try:
        with warnings.catch_warnings():
            # PIL warns (two lines per size, naming its own source) between 1x and 2x its pixel limit and still
            # decodes: a big camera photo is not an attack, and it is shrunk to the training resolution anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                # load() inside the try: Image.open only reads the header, truncation shows up when decoding.
                opened.load()
                image = convert(ImageOps.exif_transpose(opened))
                if image is opened:
                    image = image.copy()  # detach from the file handle the with-block closes
    except Image.DecompressionBombError as err:
        raise UserError(_too_many_pixels(path, what, err)) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: cannot read this {what} (truncated or not an image); fix or remove it") from err
    return image


def _too_many_pixels(path: Path, what: str, error: Image.DecompressionBombError) -> str:
    """The line for an image over twice PIL's pixel limit, which PIL refuses to decode at all."""
    # PIL raises before any pixel is read and keeps the size only in its message.
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (f"{path}: {pixels}, more than the {limit:,} PIL decodes (its guard against decompression bombs); "
            f"save the {what} smaller (training shrinks it to --resolution anyway); dreambooth has no setting "
            "to raise this limit")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit rescaled (not clipped), transparency composited over white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's own convert("L") clips 16-bit values at 255, turning nearly every pixel white; scale instead.
        # "I" is how PIL has opened 16-bit PNG, so it is read with the same 0..65535 range. (Floating-point
        # modes come only from TIFF, which IMAGE_SUFFIXES does not accept.)
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        # Transparent pixels hold arbitrary colour (often black); white is what a viewer shows and a
        # photographer would expect behind a cut-out subject.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def caption_for(path: Path, default_prompt: str) -> str:
    """The prompt for one image: the text of a same-stem .txt beside it if present and non-empty, else the default."""
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        return default_prompt
    try:
        raw = caption_path.read_bytes()
    except OSError as err:
        raise UserError(f"{caption_path}: cannot read this caption ({err.strerror or err}); fix or remove it") from err
    bom = codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""
    try:
        # Windows Notepad starts files with a BOM, which would otherwise become part of the prompt.
        text = raw[len(bom):].decode("utf-8")
    except UnicodeDecodeError as err:
        # Guessing another encoding could put wrong words in the prompt without a sign; point at the byte instead.
        utf16 = ", it is UTF-16" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else ""
        where = f"byte {len(bom) + err.start + 1} is {err.object[err.start]:#04x}"
        raise UserError(f"{caption_path}: not UTF-8 text ({where}{utf16}); save it as UTF-8 or remove it") from err
    # Collapse line breaks and runs of spaces: an editor's trailing newline must not change the prompt.
    caption = " ".join(text.split())
    return caption or default_prompt


@dataclass
class Example:
    """One training image, decoded, with the prompt it is trained under."""

    path: Path
    prompt: str
    image: Image.Image  # RGB, decoded once and kept in memory (DreamBooth sets are small)
    mask: Image.Image | None = None  # "L", same size: 255 where the subject is (see load_masks)


def load_examples(folder: str | Path, prompt: str, flag: str, limit: int | None = None) -> list[Example]:
    """Every image in `folder` (the first `limit` by name, if given) decoded and captioned now, not mid-training."""
    paths = list_images(folder, flag)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        paths = paths[:limit]
    return [Example(path=p, prompt=caption_for(p, prompt), image=load_image(p)) for p in paths]


def load_masks(examples: list[Example], folder: str | Path, flag: str) -> list[Example]:
    """The examples with their masks: for each photo, the image of the same name stem in `folder` (white or
    opaque where the subject is). A mask's alpha channel is used when it has one, else its brightness."""
    by_stem = mask_paths(folder, flag)
    masked = []
    for example in examples:
        path = by_stem.get(example.path.stem)
        if path is None:
            raise UserError(f"{flag} {folder}: no mask for {example.path.name}; add {example.path.stem}.png "
                            "(white where the subject is, black elsewhere)")
        mask = load_mask(path)
        if mask.size != example.image.size:
            raise UserError(f"{path}: the mask is {mask.size[0]}x{mask.size[1]} but {example.path.name} is "
                            f"{example.image.size[0]}x{example.image.size[1]}; save it at the photo's size")
        masked.append(replace(example, mask=mask))
    return masked


def mask_paths(folder: str | Path, flag: str) -> dict[str, Path]:
    """The masks in `folder` by name stem (the photo each belongs to); the first by name where stems repeat."""
    by_stem: dict[str, Path] = {}
    for path in list_images(folder, flag):
        by_stem.setdefault(path.stem, path)
    return by_stem


def load_mask(path: Path) -> Image.Image:
    """The mask at `path` as "L", EXIF-oriented like its photo: 255 where the subject is."""
    return _decode(path, "mask", _mask_channel)


def _mask_channel(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return _to_rgb(image).convert("L")


def _resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` (up or down), keeping the aspect ratio."""
    width, height = image.size
    if min(width, height) == resolution:
        return image
    scale = resolution / min(width, height)
    # max() guards the rounding of the long side, which must never fall below the crop size.
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def to_tensor(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Resize (short side), crop to a square, optionally flip; float32 [3, R, R] in [-1, 1]."""
    image = _resize_short_side(image, resolution)
    box = crop_box(image.size, resolution, center_crop, generator)
    return _crop_to_tensor(image, box, flip) / 127.5 - 1.0


def crop_box(size: tuple[int, int], resolution: int, center_crop: bool,
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """The square (left, top, right, bottom) to crop from an image of `size` whose short side is `resolution`."""
    width, height = size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        # Both offsets are always drawn, so the generator advances the same way for every image shape.
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    return left, top, left + resolution, top + resolution


def crop_top_left(resized_size: tuple[int, int], box: tuple[int, int, int, int], flip: bool) -> tuple[int, int]:
    """SDXL's crop conditioning (top, left): where the training square starts in the resized image the model
    was shown, `resized_size` (width, height) being that image's size and `box` the crop cut from it."""
    left, top, right, _ = box
    if flip:
        # Flipping the cut square is the same as cutting the mirrored image at its mirrored box, whose left edge
        # lies at width - right; that is the image the pixels show. diffusers' dreambooth SDXL scripts get the
        # same number by flipping before they crop. Their text-to-image SDXL script instead sets
        # x1 = image.width - x1 after cropping, where image.width is already the crop's size: that gives
        # resolution - left, which is not a position in any image (it goes negative for wide photos).
        left = resized_size[0] - right
    return top, left


def _crop_to_tensor(image: Image.Image, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    """float32 [channels, R, R] with values 0..255."""
    # np.array (a copy), not asarray: torch.from_numpy warns on PIL's read-only buffers.
    pixels = torch.from_numpy(np.array(image.crop(box), dtype=np.uint8))
    tensor = (pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels).permute(2, 0, 1).to(torch.float32)
    return tensor.flip(-1) if flip else tensor


@dataclass
class Crop:
    """One example as a batch shows it (see DreamBoothData.crop)."""

    example: Example
    sample_id: int
    resized: tuple[int, int]  # the example's size once its short side is the resolution
    box: tuple[int, int, int, int]  # the square cut from the resized image
    flip: bool
    image: Image.Image
    mask: Image.Image | None


class DreamBoothData:
    """Deterministic, step-indexed batches: the batch for a given list of sample ids is a pure function of
    (seed, ids), so a resumed run sees exactly the data an uninterrupted run would (no sampler state to save).

    Sample id k picks instance example perm_e[k % n] with epoch e = k // n and perm_e a permutation of
    range(n) drawn from a generator seeded by seeds.mix(seed, 0, e); its crop offset and flip come from
    seeds.mix(seed, 1, k). Class examples use streams 2 and 3 with their own count m, so the same k also
    walks the class set one full epoch at a time.
    """

    def __init__(
        self,
        instance: list[Example],
        classes: list[Example] | None,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
    ) -> None:
        if not instance:
            raise ValueError("DreamBoothData needs at least one instance example")
        if classes is not None and not classes:
            # An empty list is not "no prior preservation": silently training without class images is a
            # known failure mode of other trainers, so the caller must say None explicitly.
            raise ValueError("classes is an empty list; pass None to train without class images")
        self.instance = instance
        self.classes = classes
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        # Resizing is the only costly step and does not depend on randomness, so it is done once here;
        # to_tensor leaves an image whose short side already equals the resolution untouched.
        self._instance_images = [_resize_short_side(e.image, resolution) for e in instance]
        self._class_images = [_resize_short_side(e.image, resolution) for e in classes or []]
        self.has_masks = any(e.mask is not None for e in instance)
        if self.has_masks and not all(e.mask is not None for e in instance):
            raise ValueError("either every instance example has a mask or none has")
        self._instance_masks = [_resize_short_side(e.mask, resolution) for e in instance] if self.has_masks else []

    @property
    def num_instance(self) -> int:
        return len(self.instance)

    @property
    def num_images(self) -> int:
        """Distinct images a batch can hold when every image has one crop (see every_image)."""
        return (self.num_instance + self.num_class) * (2 if self.random_flip else 1)

    @property
    def num_class(self) -> int:
        return len(self.classes) if self.classes is not None else 0

    def _pick(self, sample_id: int, count: int, order_stream: int) -> int:
        epoch, position = divmod(sample_id, count)
        permutation = torch.randperm(count, generator=seeds.generator(self.seed, order_stream, epoch))
        return int(permutation[position])

    def _augmentation(self, size: tuple[int, int], sample_id: int,
                      augment_stream: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box and flip of `sample_id` in an image of `size` (already resized)."""
        generator = seeds.generator(self.seed, augment_stream, sample_id)
        # The flip is drawn even when random_flip is off so the crop offsets do not depend on that flag.
        flip = bool(torch.rand((), generator=generator) < 0.5) and self.random_flip
        return crop_box(size, self.resolution, self.center_crop, generator), flip

    def _pixels(self, image: Image.Image, sample_id: int, augment_stream: int,
                mask: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """The image in [-1, 1] and its mask in [0, 1], cut by the same crop and flip, and the crop's
        (top, left) for SDXL, read off that same crop (no further random draw)."""
        box, flip = self._augmentation(image.size, sample_id, augment_stream)
        pixels = _crop_to_tensor(image, box, flip) / 127.5 - 1.0
        cut_mask = _crop_to_tensor(mask, box, flip) / 255.0 if mask is not None else None
        return pixels, cut_mask, crop_top_left(image.size, box, flip)

    def first_sample_ids(self, classes: bool = False) -> list[int]:
        """For each instance example (class example with `classes`), in order, the sample id that first shows it:
        its place in the first epoch."""
        count, stream = (self.num_class, _CLASS_ORDER) if classes else (self.num_instance, _INSTANCE_ORDER)
        if not count:
            return []
        permutation = torch.randperm(count, generator=seeds.generator(self.seed, stream, 0))
        return [int(k) for k in torch.argsort(permutation)]

    def crop(self, sample_id: int, classes: bool = False) -> Crop:
        """The instance example (class example with `classes`) that `sample_id` shows, cut as batch() cuts it, as
        8-bit images: batch() holds these very pixels, scaled to [-1, 1] (masks to [0, 1])."""
        if classes:
            index = self._pick(sample_id, self.num_class, _CLASS_ORDER)
            example, image, mask, stream = self.classes[index], self._class_images[index], None, _CLASS_AUGMENT
        else:
            index = self._pick(sample_id, self.num_instance, _INSTANCE_ORDER)
            example, image, stream = self.instance[index], self._instance_images[index], _INSTANCE_AUGMENT
            mask = self._instance_masks[index] if self.has_masks else None
        box, flip = self._augmentation(image.size, sample_id, stream)
        cut = [picture.crop(box) if picture is not None else None for picture in (image, mask)]
        if flip:
            cut = [piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if piece is not None else None for piece in cut]
        return Crop(example, sample_id, image.size, box, flip, *cut)

    def every_image(self) -> Iterator[torch.Tensor] | None:
        """Every distinct image a batch can hold, in [-1, 1], when they are few: one crop per image (centre
        crops, or photos already square at the resolution), both flips with random_flip. None when random
        crops of larger photos make them many (a cache then fills as the batches come)."""
        images = self._instance_images + self._class_images
        square = (self.resolution, self.resolution)
        if not self.center_crop and any(image.size != square for image in images):
            return None
        flips = (False, True) if self.random_flip else (False,)
        return (_crop_to_tensor(image, crop_box(image.size, self.resolution, True, None), flip) / 127.5 - 1.0
                for image in images for flip in flips)

    def every_prompt(self) -> list[str]:
        """Every distinct prompt a batch can hold (captions and the class prompt), in first-seen order."""
        return list(dict.fromkeys(example.prompt for example in self.instance + (self.classes or [])))

    def batch(self, sample_ids: list[int]) -> dict:
        """Instance examples for `sample_ids`, then (with class images) class examples for the same ids.
        With masks, "masks" [B, 1, R, R] holds each example's mask (class examples: all ones).
        For SDXL's size conditioning, "original_sizes" holds each example's (height, width) as decoded,
        before any resize, and "crop_top_lefts" the (top, left) of its crop (see crop_top_left)."""
        if any(k < 0 for k in sample_ids):
            raise ValueError(f"sample ids must be non-negative, got {sample_ids}")
        pixels: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        prompts: list[str] = []
        original_sizes: list[tuple[int, int]] = []
        crop_top_lefts: list[tuple[int, int]] = []
        for k in sample_ids:
            index = self._pick(k, self.num_instance, _INSTANCE_ORDER)
            mask = self._instance_masks[index] if self.has_masks else None
            image, cut_mask, corner = self._pixels(self._instance_images[index], k, _INSTANCE_AUGMENT, mask)
            pixels.append(image)
            masks += [cut_mask] if cut_mask is not None else []
            prompts.append(self.instance[index].prompt)
            original_sizes.append(self.instance[index].image.size[::-1])
            crop_top_lefts.append(corner)
        if self.classes is not None:
            for k in sample_ids:
                index = self._pick(k, self.num_class, _CLASS_ORDER)
                image, _, corner = self._pixels(self._class_images[index], k, _CLASS_AUGMENT)
                pixels.append(image)
                prompts.append(self.classes[index].prompt)
                original_sizes.append(self.classes[index].image.size[::-1])
                crop_top_lefts.append(corner)
        batch = {"pixel_values": torch.stack(pixels), "prompts": prompts, "num_instance": len(sample_ids),
                 "original_sizes": original_sizes, "crop_top_lefts": crop_top_lefts}
        if self.has_masks:
            # Class examples are learned whole.
            whole = torch.ones(len(pixels) - len(masks), 1, self.resolution, self.resolution)
            batch["masks"] = torch.cat([torch.stack(masks), whole])
        return batch
