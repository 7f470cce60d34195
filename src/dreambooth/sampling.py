"""Generation: samplers, seeded rendering, the manifest and the labelled comparison grid (PNG metadata: png_metadata).

`render` is the one way images are made (the `generate` command, class images, validation during
training), so an image depends only on its prompt, seed and setting, never on batch size or position.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from dreambooth.config import SCHEDULER_NAMES, GenerateConfig
from dreambooth.encoding import warn_long_prompts
from dreambooth.errors import UserError
from dreambooth.files import (MANIFEST, append_jsonl, atomic_write_text, folder_lock, move_aside,
                              read_jsonl, remove_partial_files)
from dreambooth.interrupts import signal_name, stop_requests
from dreambooth.models import (check_latent_size, default_device, inference_dtype, load_pipeline, resolve_model,
                               source_vae_scale_factor)
from dreambooth.png_metadata import save_png

IMAGES = "images"
GRID = "grid.png"
SETTINGS = "generate.json"  # what the generation in a folder was made with, written before its first image
GENERATION_FILES = [IMAGES, MANIFEST, GRID, SETTINGS]

# Where render() keeps the scheduler config the pipeline came with.
_BASE_SCHEDULER_CONFIG = "_dreambooth_base_scheduler_config"


# CLI name -> diffusers class name.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
assert set(SCHEDULER_CLASSES) == set(SCHEDULER_NAMES), "config.SCHEDULER_NAMES and SCHEDULER_CLASSES disagree"


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULER_CLASSES:
        raise UserError(f"--scheduler {name}: unknown sampler; choose one of {', '.join(SCHEDULER_NAMES)}")


def make_scheduler(name: str, base_config: Any):
    """A sampler by its CLI name, with the model's betas and prediction type taken from `base_config`."""
    import diffusers

    check_scheduler_name(name)
    overrides: dict[str, Any] = {}
    if name == "pndm":
        # Stable Diffusion samples with PLMS only; the Runge-Kutta warm-up fails below ~4 steps and
        # quadruples the UNet calls of the first steps.
        overrides["skip_prk_steps"] = True
    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(base_config, **overrides)


@dataclass(frozen=True)
class SamplingSetting:
    """How an image is sampled, apart from its prompt and seed."""

    steps: int
    guidance: float
    scheduler: str

    @property
    def label(self) -> str:
        return f"{self.scheduler}, {self.steps} steps, guidance {self.guidance:g}"


def render(pipeline, prompts: list[str], seeds: list[int], setting: SamplingSetting, *, negative_prompt: str = "",
           height: int | None = None, width: int | None = None, batch_size: int = 1) -> list[Image.Image]:
    """Image i shows prompts[i] made with seeds[i]; batches only change speed, not pixels."""
    if len(prompts) != len(seeds):
        raise ValueError(f"render: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    if batch_size < 1:
        raise ValueError(f"render: batch_size must be positive, not {batch_size}")
    base = getattr(pipeline, _BASE_SCHEDULER_CONFIG, None)
    if base is None:
        base = pipeline.scheduler.config
        setattr(pipeline, _BASE_SCHEDULER_CONFIG, base)
    pipeline.scheduler = make_scheduler(setting.scheduler, base)
    pipeline.set_progress_bar_config(disable=True)
    # diffusers advises CPU generators on MPS (its own are unsupported in older torch); the noise is moved over.
    generator_device = "cpu" if pipeline.device.type == "mps" else pipeline.device
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        # One generator per image: diffusers then draws each image's noise from its own stream.
        generators = [torch.Generator(device=generator_device).manual_seed(seed)
                      for seed in seeds[start : start + batch_size]]
        result = pipeline(
            prompt=batch_prompts,
            # None (not "") lets SDXL use its zeroed unconditional embedding for an empty negative prompt.
            negative_prompt=[negative_prompt] * len(batch_prompts) if negative_prompt else None,
            num_inference_steps=setting.steps,
            guidance_scale=setting.guidance,
            height=height,
            width=width,
            generator=generators,
            output_type="pil",
        )
        images.extend(result.images)
    return images


def save_listed_image(image: Image.Image, folder: Path, file: str, prompt: str, seed: int, setting: SamplingSetting,
                      *, negative_prompt: str, model: str, listed: bool = False) -> dict[str, Any]:
    """Save a rendered image with how it was made as PNG text, then list it in the folder's manifest (unless it is
    `listed` there already: a continued generation re-rendering a deleted image); return the line.

    The one record shape of a folder of rendered images (`generate` and class images), which `evaluate` reads.
    """
    record = {"file": file, "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": setting.steps,
              "guidance": setting.guidance, "scheduler": setting.scheduler, "model": model,
              "height": image.height, "width": image.width}
    save_png(image, Path(folder) / file, {key: value for key, value in record.items() if key != "file"})
    if not listed:
        append_jsonl(Path(folder) / MANIFEST, record)  # after the image: a line never names a missing file
    return record


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap to a pixel width; words wider than a line are split between characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and font.getlength(line + char) > width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def make_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """A labelled table: column labels on top, row labels on the left, one image per cell.

    The cells' boxes (left, top, right, bottom), row by row, are in `grid.info["cells"]`.
    """
    if not rows or not rows[0]:
        raise ValueError("make_grid: no images")
    n_cols = len(rows[0])
    if any(len(row) != n_cols for row in rows) or len(row_labels) != len(rows) or len(column_labels) != n_cols:
        raise ValueError("make_grid: every row needs one image per column label, and one row label per row")
    image_w = max(image.width for row in rows for image in row)
    image_h = max(image.height for row in rows for image in row)
    # Tiny images are blown up by a whole factor (nearest neighbour, so no invented detail) to give labels room.
    scale = max(1, math.ceil(128 / max(image_w, image_h)))
    cell_w, cell_h = image_w * scale, image_h * scale
    gap = max(2, cell_w // 64)
    font = ImageFont.load_default(size=min(32, max(12, round(cell_w / 14))))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font.getbbox("Ag")[3], 0)
    line_h = ascent + descent + 2

    header = [_wrap(label, font, cell_w - 2 * gap) for label in column_labels]
    top = max(len(lines) for lines in header) * line_h + 2 * gap if any(column_labels) else gap
    label_w = max((font.getlength(label) for label in row_labels), default=0)
    left = round(min(cell_w, label_w) + 2 * gap) if any(row_labels) else gap
    side = [_wrap(label, font, left - 2 * gap) for label in row_labels]

    grid = Image.new("RGB", (left + n_cols * (cell_w + gap), top + len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    cells = []
    for c, lines in enumerate(header):
        x = left + c * (cell_w + gap)
        for i, line in enumerate(lines):
            draw.text((x + (cell_w - font.getlength(line)) / 2, gap + i * line_h), line, fill="black", font=font)
    for r, row in enumerate(rows):
        y = top + r * (cell_h + gap)
        text_y = y + (cell_h - len(side[r]) * line_h) / 2
        for i, line in enumerate(side[r]):
            draw.text((gap, text_y + i * line_h), line, fill="black", font=font)
        for c, image in enumerate(row):
            x = left + c * (cell_w + gap)
            scaled = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            grid.paste(scaled, (x, y))
            cells.append([x, y, x + scaled.width, y + scaled.height])
    grid.info["cells"] = json.dumps(cells)
    return grid


def _source(value: str | None) -> str | None:
    """A model, VAE or model config as compared: a local path by what it names, anything else (a hub id) as is."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def generation_record(config: GenerateConfig) -> dict[str, Any]:
    """What decides a generation's images, manifest and grid, by GenerateConfig's names (repeats dropped, as
    `generate` drops them). A command with the same record makes the same folder, so it continues one: "the same
    command". Left out since they change no pixel: --output (the folder itself), --overwrite, --allow-pickle; and
    --batch-size, which is kept beside the record because a continuation renders in the first command's batches
    (batching moves pixels by float rounding). A model is compared by name or path, not by its weights; the first
    command's spelling of it ("model_label") names it in every image's metadata."""
    record = {"model": _source(config.model), "vae": _source(config.vae), "model_config": _source(config.model_config),
              "lora_scale": config.lora_scale, "prompt": list(config.prompt), "negative_prompt": config.negative_prompt,
              "seeds": list(dict.fromkeys(config.seeds)), "scheduler": list(dict.fromkeys(config.scheduler)),
              "steps": list(dict.fromkeys(config.steps)), "guidance": list(dict.fromkeys(config.guidance)),
              "height": config.height, "width": config.width,
              # Only when given, so a folder made before these settings existed still continues.
              **{name: getattr(config, name) for name in ("revision", "variant") if getattr(config, name)}}
    return json.loads(json.dumps(record))  # as it reads back from the file (tuples become lists)


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def holds_generation(folder: Path) -> bool:
    return any((folder / name).exists() for name in GENERATION_FILES)


def read_generation_settings(folder: Path) -> dict[str, Any] | None:
    """The settings recorded in `folder` by the generation there; None if there are none or they are unreadable."""
    try:
        settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def generation_difference(folder: Path, config: GenerateConfig) -> str | None:
    """None if `folder` holds no generation or the one `config` makes (then `generate` continues it); else how the
    generation there differs, as words that follow "already holds a generation"."""
    if not holds_generation(folder):
        return None
    earlier = read_generation_settings(folder)
    if earlier is None:
        return f"whose settings are unknown (no readable {SETTINGS})"
    for key, value in generation_record(config).items():
        if earlier.get(key) != value:
            return f"made with other settings (--{key.replace('_', '-')} was {earlier.get(key)!r}, now {value!r})"
    return None


def claim_output(folder: Path, config: GenerateConfig) -> dict[str, Any] | None:
    """The recorded settings of the generation in `folder` that `config` continues, or None to start afresh (none
    there, or --overwrite: moved aside); another generation is refused. Call it holding the folder's lock."""
    if not holds_generation(folder):
        return None
    if config.overwrite:
        moved = move_aside(folder, GENERATION_FILES)
        print(f"generate: moved the earlier generation in {folder} to {moved}")
        return None
    if difference := generation_difference(folder, config):
        raise UserError(f"--output {folder} already holds a generation {difference}; pick another folder, or pass "
                        "--overwrite to move it aside")
    return read_generation_settings(folder)


def image_name(setting: SamplingSetting, prompt_index: int, seed: int, with_scheduler: bool = False) -> str:
    prefix = f"{setting.scheduler}-" if with_scheduler else ""
    return f"{prefix}s{setting.steps}-g{setting.guidance:g}-p{prompt_index}-seed{seed}.png"


def generate(config: GenerateConfig) -> Path:
    """Render every prompt x seed under every (steps, guidance) setting; write images, manifest and grid. The same
    command after an interruption renders only the missing images, and the folder ends as an uninterrupted run's."""
    prompts = list(config.prompt)
    if not prompts or not config.guidance:
        raise UserError(f"{'--prompt' if not prompts else '--guidance'}: give at least one value")
    # Repeated values would name the same file twice.
    seeds = list(dict.fromkeys(config.seeds))
    schedulers = list(dict.fromkeys(config.scheduler))
    settings = [SamplingSetting(steps, guidance, scheduler) for scheduler, steps, guidance
                in product(schedulers, dict.fromkeys(config.steps), dict.fromkeys(config.guidance))]
    columns = list(product(range(len(prompts)), seeds))
    for scheduler in schedulers:
        check_scheduler_name(scheduler)  # fail before minutes of model loading

    output = Path(config.output)
    with folder_lock(output), stop_requests("image") as request:
        earlier = claim_output(output, config)
        if removed := remove_partial_files(output) + remove_partial_files(output / IMAGES):
            print(f"generate: removed {removed} partial file(s) an interrupted run left in {output}")
        batch_size = int(earlier.get("batch_size", config.batch_size)) if earlier else config.batch_size
        model_label = str(earlier.get("model_label", config.model)) if earlier else config.model
        if batch_size != config.batch_size:
            print(f"generate: continuing in batches of {batch_size}, as the generation in {output} began "
                  "(other batches could change the last bit of a pixel)")
        files = {(setting, p, seed): f"{IMAGES}/{image_name(setting, p, seed, len(schedulers) > 1)}"
                 for setting in settings for p, seed in columns}
        listed = {record.get("file") for record in read_jsonl(output / MANIFEST)}
        done = {key for key, file in files.items() if file in listed and (output / file).is_file()}
        # The batches of an uninterrupted run; one missing any image is rendered whole, since a part of it alone
        # could come out a bit different. Only its missing images are written.
        batches = [(setting, columns[start : start + batch_size]) for setting in settings
                   for start in range(0, len(columns), batch_size)]
        todo = [(setting, batch) for setting, batch in batches if any((setting, *c) not in done for c in batch)]
        if todo:
            device = default_device()
            source = resolve_model(config.model, config.allow_pickle, config.model_config,
                                   revision=config.revision, variant=config.variant)
            check_latent_size(source_vae_scale_factor(source), {"--height": config.height, "--width": config.width})
            pipeline = load_pipeline(source, torch_dtype=inference_dtype(device), lora_scale=config.lora_scale,
                                     vae=config.vae).to(device)
            warn_long_prompts(pipeline.tokenizer, prompts, "--prompt")
            warn_long_prompts(pipeline.tokenizer, [config.negative_prompt] if config.negative_prompt else [],
                              "--negative-prompt")
            if earlier is None:  # before the first image, so a folder never holds images of unknown settings
                record = {**generation_record(config), "batch_size": batch_size, "model_label": model_label}
                atomic_write_text(output / SETTINGS, json.dumps(record, indent=1) + "\n")
        with tqdm(total=sum(len(batch) for _, batch in todo), desc="generate", unit="img") as progress:
            for setting, batch in todo:
                if request.requested:
                    request.stop(f"stopped after {len(done)} of {len(files)} images ({signal_name(request.signum)}); "
                                 "run the same command again to render the rest")
                images = render(pipeline, [prompts[p] for p, _ in batch], [seed for _, seed in batch], setting,
                                negative_prompt=config.negative_prompt, height=config.height, width=config.width,
                                batch_size=batch_size)
                for (p, seed), image in zip(batch, images):
                    if (setting, p, seed) in done:
                        continue
                    file = files[setting, p, seed]
                    save_listed_image(image, output, file, prompts[p], seed, setting,
                                      negative_prompt=config.negative_prompt, model=model_label, listed=file in listed)
                    done.add((setting, p, seed))
                progress.update(len(batch))

        # The grid from the files, so a continued folder's grid is an uninterrupted one's.
        rows = [[load_rgb(output / files[setting, p, seed]) for p, seed in columns] for setting in settings]
        column_labels = [f"{prompts[p]}\nseed {seed}" for p, seed in columns]
        grid = make_grid(rows, [setting.label for setting in settings], column_labels)
        save_png(grid, output / GRID, {"model": model_label, "rows": [s.label for s in settings],
                                       "columns": column_labels, "cells": json.loads(grid.info["cells"])})
    return output
