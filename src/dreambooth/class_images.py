"""Top up a folder of class images to N with the base model, for prior preservation.

Existing images are kept and counted. New image i is `class-NNNNN.png` made with seed `seed + i`, so a
top-up after an interruption never repeats an image; `manifest.jsonl` beside them records how each was made.
One process adds to a folder at a time (its lock); SIGTERM or Ctrl-C stops after the current batch.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth.config import ClassImagesConfig
from dreambooth.data import IMAGE_SUFFIXES
from dreambooth.errors import UserError
from dreambooth.files import folder_lock, partial_files, remove_partial_files
from dreambooth.interrupts import signal_name, stop_requests
from dreambooth.models import default_device, inference_dtype, load_pipeline, resolve_model, without_safety_checker
from dreambooth.sampling import SamplingSetting, render, save_listed_image

GENERATED_NAME = re.compile(r"^class-(\d{5,})\.png$", re.IGNORECASE)


def existing_images(folder: Path) -> list[Path]:
    """Every image already in the folder, whoever made it."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def free_indices(folder: Path, count: int) -> list[int]:
    """The first `count` indices whose `class-NNNNN.png` names nothing in the folder yet (in any case, for
    case-insensitive disks: a user's CLASS-00001.PNG is never replaced)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    taken = {int(m.group(1)) for name in names if (m := GENERATED_NAME.match(name))}
    indices, candidate = [], 0
    while len(indices) < count:
        if candidate not in taken:
            indices.append(candidate)
        candidate += 1
    return indices


def top_up_class_images(config: ClassImagesConfig, flag: str = "--output") -> list[Path]:
    """Make sure `config.output` (given by `flag`: --output for `class-images`, --class-dir for `train`) holds at
    least `config.num_images` images; return all of them. SIGTERM or Ctrl-C stops after the current batch."""
    folder = Path(config.output)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder; class images need a folder")
    have = existing_images(folder)
    if len(have) >= config.num_images:
        # A full folder is only read, so trains sharing it start side by side; a killed writer's leftovers go
        # unless a writer holds the folder now (its temp files are live).
        if partial_files(folder):
            with contextlib.suppress(UserError), folder_lock(folder, flag):
                remove_partial_files(folder)
        print(f"class images: {folder} already holds {len(have)} (wanted {config.num_images}); nothing to generate")
        return have
    with folder_lock(folder, flag), stop_requests("image") as request:
        if removed := remove_partial_files(folder):
            print(f"class images: removed {removed} partial file(s) an interrupted run left in {folder}")
        have = existing_images(folder)  # counted under the lock: another writer may have just filled the folder
        missing = config.num_images - len(have)
        if missing <= 0:
            return have
        print(f"class images: {folder} holds {len(have)}; generating {missing} with '{config.prompt}'")
        source = resolve_model(config.model, config.allow_pickle, config.model_config,
                               revision=config.revision, variant=config.variant)
        device = default_device()
        pipeline = load_pipeline(source, torch_dtype=inference_dtype(device), vae=config.vae,
                                 **without_safety_checker(source)).to(device)
        setting = SamplingSetting(steps=config.steps, guidance=config.guidance, scheduler=config.scheduler)
        indices = free_indices(folder, missing)
        # Inference mode: no autograd bookkeeping at all (the pipeline's own no_grad still tracks versions and views).
        with torch.inference_mode(), tqdm(total=missing, desc="class images", unit="img") as progress:
            for start in range(0, missing, config.batch_size):
                if request.requested:
                    request.stop(f"stopped after {start} of the {missing} class images to generate "
                                 f"({signal_name(request.signum)}); run the same command again to generate the rest")
                batch = indices[start : start + config.batch_size]
                seeds = [config.seed + index for index in batch]
                images = render(pipeline, [config.prompt] * len(batch), seeds, setting,
                                negative_prompt=config.negative_prompt, batch_size=len(batch))
                for index, seed, image in zip(batch, seeds, images):
                    save_listed_image(image, folder, f"class-{index:05d}.png", config.prompt, seed, setting,
                                      negative_prompt=config.negative_prompt, model=config.model)
                progress.update(len(batch))
        del pipeline
        return existing_images(folder)
