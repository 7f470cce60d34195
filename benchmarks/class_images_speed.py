"""Class-image generation: images per second of our default sampler against the common trainers' 50-step PNDM.

    python benchmarks/class_images_speed.py [--images 16] [--repeats 2] [--threads 2] [--output out/class-images-speed]
                                            [--grid PATH] [--json results.json] [--models miniworld sd-shaped] [--quick]

Every configuration tops up an empty folder through the real code path (`top_up_class_images` with a
`ClassImagesConfig`, the same call `dreambooth class-images` and `train` make), prompt "a photo of a cat",
guidance 7.5, image i with seed i:
- `default`: our defaults, read from `ClassImagesConfig` (DPM-Solver++ at 25 steps, batch 4);
- `baseline`: what diffusers' examples/dreambooth/train_dreambooth.py does. It calls `pipeline(prompt)` with the
  model's own scheduler (PNDM for Stable Diffusion 1.5) and the pipeline's default 50 steps, guidance 7.5, in
  batches of `--sample_batch_size` (default 4), so the baseline is PNDM (PLMS), 50 steps, batch 4;
- `baseline-batch1`: the same one image at a time, as trainers that loop over single images do.
Model loading is timed apart (column `load s`) and left out of images/s; writing the PNGs and the manifest is in.
A warm-up top-up of each configuration runs first; then the configurations alternate (A B C A B C ...) over
`--repeats` rounds. Machines are noisy: compare the ratios within one run. `vs baseline` divides the median
run times; on a shared machine one run's wall time can swing several times over (a thread that loses its core
stalls the other at every barrier), so the table also gives `vs (rounds)`, the median of the ratios within each
round (runs next to each other in time), `vs (best)`, the ratio of each configuration's fastest run (the one
least slowed by other work), and `vs (CPU)`, the ratio of the process's CPU seconds (waiting for a core does not
count; threads spinning at a barrier do).

Quality (the miniature world only; `sd-shaped` has random weights): the grid `--grid` shows the same seeds under
both settings (rows = setting, columns = seeds: the first `--grid-seeds`, and the one on which the two settings
differ most). Beside it, for every seed: the mean absolute pixel difference
(0-255) between the two settings' images, against the same difference between images of different seeds; the
world-CLIP's cosine between the two settings' images against that between different seeds; and the share of images
the world-CLIP classifies as a cat under each setting.

Models: `miniworld` (the shipped miniature Stable Diffusion, 64 px) and, on request, `sd-shaped` (Stable
Diffusion 1.5's block structure at a tenth of its width, random weights, 256 px; see train_speed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photo of a cat"
BASELINE = "baseline"
CONFIGS = {  # name -> (fields of ClassImagesConfig changed from its defaults, label)
    "default": ({}, "ours"),
    BASELINE: ({"scheduler": "pndm", "steps": 50, "batch_size": 4}, "diffusers' train_dreambooth.py"),
    "baseline-batch1": ({"scheduler": "pndm", "steps": 50, "batch_size": 1}, "one at a time"),
}
GRID_ROWS = ("default", BASELINE)  # the two settings compared for quality (batch size changes no pixel)


def class_config(model: str, name: str, folder: Path, images: int, **changes):
    """The ClassImagesConfig of one configuration: our defaults, with the configuration's changes."""
    from dreambooth.config import ClassImagesConfig

    config = ClassImagesConfig(model=model, prompt=PROMPT, output=str(folder), num_images=images, seed=0)
    return dataclasses.replace(config, **{**CONFIGS[name][0], **changes})


def top_up(config) -> dict:
    """Run one top-up into an empty folder; its generation's wall and CPU seconds, model loading timed apart."""
    from dreambooth import class_images

    loads: list[tuple[float, float]] = []  # (wall, CPU) seconds
    original = class_images.load_pipeline

    def timed_load(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        pipeline = original(*args, **kwargs)
        loads.append((time.perf_counter() - started, time.process_time() - cpu))
        return pipeline

    class_images.load_pipeline = timed_load
    try:
        # The top-up's own lines and progress bars would bury the table.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            started, cpu = time.perf_counter(), time.process_time()
            paths = class_images.top_up_class_images(config)
            total, total_cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        class_images.load_pipeline = original
    if len(paths) != config.num_images:
        raise RuntimeError(f"{config.output}: {len(paths)} images, wanted {config.num_images}")
    load, load_cpu = (sum(column) for column in zip(*loads, strict=True)) if loads else (0.0, 0.0)
    return {"seconds": total - load, "cpu_seconds": total_cpu - load_cpu, "load_seconds": load}


def measure(model: str, images: int, repeats: int, keep: Path, scratch: Path) -> dict:
    """Every configuration, alternating over `repeats` rounds; round 0's images are kept under `keep`."""
    for name in CONFIGS:  # warm-up: every batch shape once, two steps
        warm = class_config(model, name, scratch / f"warm-{name}", 1, steps=2)
        top_up(dataclasses.replace(warm, num_images=warm.batch_size))
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for round_ in range(repeats):
        for name in CONFIGS:
            folder = (keep if round_ == 0 else scratch / f"round{round_}") / name
            runs[name].append(top_up(class_config(model, name, folder, images)))
    results = {}
    for name, (_, label) in CONFIGS.items():
        config = class_config(model, name, keep / name, images)
        seconds = statistics.median(run["seconds"] for run in runs[name])
        cpu_seconds = statistics.median(run["cpu_seconds"] for run in runs[name])
        results[name] = {"label": label, "scheduler": config.scheduler, "steps": config.steps,
                         "batch_size": config.batch_size, "guidance": config.guidance, "images": images,
                         "seconds": seconds, "images_per_second": images / seconds,
                         "cpu_seconds": cpu_seconds, "images_per_cpu_second": images / cpu_seconds,
                         "load_seconds": statistics.median(run["load_seconds"] for run in runs[name]),
                         "runs_seconds": [run["seconds"] for run in runs[name]],
                         "runs_cpu_seconds": [run["cpu_seconds"] for run in runs[name]], "folder": str(keep / name)}
    for name, result in results.items():
        baseline = results[BASELINE]
        result["ratio_to_baseline"] = result["images_per_second"] / baseline["images_per_second"]
        result["cpu_ratio_to_baseline"] = result["images_per_cpu_second"] / baseline["images_per_cpu_second"]
        # The fastest run of each: the one least slowed by other work (interference only ever adds time).
        result["best_ratio_to_baseline"] = min(baseline["runs_seconds"]) / min(result["runs_seconds"])
        # Each round's runs follow each other closely: a ratio within a round shares that round's machine load.
        result["round_ratios"] = [theirs["seconds"] / ours["seconds"]
                                  for ours, theirs in zip(runs[name], runs[BASELINE])]
        result["round_ratio_median"] = statistics.median(result["round_ratios"])
    return results


def load_images(folder: Path, count_or_seeds: int | list[int]) -> list[Image.Image]:
    """Class images of a top-up folder by seed (image i has seed i): seeds 0 to count - 1, or the seeds listed."""
    images = []
    seeds = range(count_or_seeds) if isinstance(count_or_seeds, int) else count_or_seeds
    for index in seeds:
        with Image.open(folder / f"class-{index:05d}.png") as image:
            images.append(image.convert("RGB"))
    return images


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two images' pixels, 0 to 255."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def quality(configs: dict, images: int) -> dict:
    """Same seed under both settings against different seeds: pixels, world-CLIP embeddings and its cat rate."""
    from dreambooth.miniworld.measure import embed_images, load_world_clip, zero_shot

    ours, theirs = (load_images(Path(configs[name]["folder"]), images) for name in GRID_ROWS)
    one_by_one = load_images(Path(configs["baseline-batch1"]["folder"]), images)
    pairs = list(itertools.combinations(range(images), 2))
    same_seed = [pixel_distance(a, b) for a, b in zip(ours, theirs)]
    other_seeds = [pixel_distance(row[i], row[j]) for row in (ours, theirs) for i, j in pairs]

    judge = load_world_clip()
    embedded = [embed_images(judge, row) for row in (ours, theirs)]
    cosine_same = (embedded[0] * embedded[1]).sum(dim=1).tolist()
    cosine_other = [float(e[i] @ e[j]) for e in embedded for i, j in pairs]
    kinds = [zero_shot(judge, None, embeddings=e)["kind"] for e in embedded]
    result = {
        "pixel_mad_same_seed": statistics.mean(same_seed), "pixel_mad_same_seed_max": max(same_seed),
        "pixel_mad_same_seed_worst_seed": same_seed.index(max(same_seed)),  # image i has seed i
        "pixel_mad_different_seeds": statistics.mean(other_seeds),
        "clip_cosine_same_seed": statistics.mean(cosine_same), "clip_cosine_same_seed_min": min(cosine_same),
        "clip_cosine_different_seeds": statistics.mean(cosine_other),
        "same_kind_same_seed": statistics.mean(a == b for a, b in zip(*kinds)),
        # render's promise: a batch changes speed, never pixels
        "batch1_vs_batch4_pixel_max": max(float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b)).max())
                                          for a, b in zip(one_by_one, theirs)),
    }
    for name, predicted in zip(GRID_ROWS, kinds):
        result[f"cat_rate_{name}"] = statistics.mean(kind == "cat" for kind in predicted)
    return result


def write_grid(configs: dict, seeds: list[int], path: Path) -> Path:
    """Rows = the two settings, columns = the seeds, labelled (the project's comparison grid)."""
    from dreambooth.sampling import make_grid, save_png

    rows = [load_images(Path(configs[name]["folder"]), seeds) for name in GRID_ROWS]
    labels = [f"{describe_result(configs[name])} ({configs[name]['label']})" for name in GRID_ROWS]
    columns = [f"seed {seed}" for seed in seeds]
    grid = make_grid(rows, labels, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path, {"prompt": PROMPT, "rows": labels, "columns": columns,
                          "cells": json.loads(grid.info["cells"])})
    return path


def describe_result(result: dict) -> str:
    return f"{result['scheduler']} {result['steps']} steps, batch {result['batch_size']}"


def print_table(results: dict) -> None:
    print(f"{'model':<10} {'configuration':<42} {'images':>6} {'load s':>7} {'gen s':>7} {'images/s':>9} "
          f"{'vs baseline':>12} {'vs (rounds)':>12} {'vs (best)':>10} {'CPU s':>7} {'vs (CPU)':>9}  "
          f"runs (s)  ratio per round")
    for model, measured in results.items():
        for name, result in measured["configs"].items():
            runs = " ".join(f"{seconds:.1f}" for seconds in result["runs_seconds"])
            rounds = " ".join(f"{ratio:.2f}" for ratio in result["round_ratios"])
            print(f"{model:<10} {name + ': ' + describe_result(result):<42} {result['images']:>6} "
                  f"{result['load_seconds']:>7.2f} {result['seconds']:>7.2f} {result['images_per_second']:>9.3f} "
                  f"{result['ratio_to_baseline']:>11.2f}x {result['round_ratio_median']:>11.2f}x "
                  f"{result['best_ratio_to_baseline']:>9.2f}x {result['cpu_seconds']:>7.1f} "
                  f"{result['cpu_ratio_to_baseline']:>8.2f}x  {runs}  {rounds}")
    for model, measured in results.items():
        if "quality" in measured:
            q = measured["quality"]
            print(f"\n{model} quality, {' vs '.join(GRID_ROWS)} (same seeds), grid: {measured['grid']}")
            print(f"  pixel |difference| (0-255): same seed {q['pixel_mad_same_seed']:.1f} "
                  f"(max {q['pixel_mad_same_seed_max']:.1f}, seed {q['pixel_mad_same_seed_worst_seed']}), "
                  f"different seeds {q['pixel_mad_different_seeds']:.1f}")
            print(f"  world-CLIP cosine: same seed {q['clip_cosine_same_seed']:.3f} "
                  f"(min {q['clip_cosine_same_seed_min']:.3f}), different seeds {q['clip_cosine_different_seeds']:.3f}")
            print(f"  world-CLIP sees a cat: default {q['cat_rate_default']:.0%}, "
                  f"baseline {q['cat_rate_baseline']:.0%}; same kind for the same seed {q['same_kind_same_seed']:.0%}")
            print(f"  baseline batch 1 vs batch 4, largest pixel difference: {q['batch1_vs_batch4_pixel_max']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="class images per configuration and run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=("miniworld", "sd-shaped"), default=["miniworld"])
    parser.add_argument("--output", type=Path, default=Path("out/class-images-speed"),
                        help="folder for the first round's class images and the grid")
    parser.add_argument("--grid", type=Path, help="the side-by-side grid PNG (default OUTPUT/grid.png)")
    parser.add_argument("--grid-seeds", type=int, default=8,
                        help="the grid shows seeds 0 to N - 1, and the seed on which the two settings differ most")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="4 images, one round, the miniature world only (CI)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.models = 4, 1, ["miniworld"]
    grid_path = args.grid or args.output / "grid.png"

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            keep = args.output / model
            if keep.exists() and any(keep.iterdir()):
                parser.error(f"{keep} is not empty; remove it or pick another --output")
            name = "miniworld"
            if model == "sd-shaped":
                from train_speed import build_sd_shaped  # beside this script

                name = str(build_sd_shaped(Path(tmp) / "sd-shaped"))
            configs = measure(name, args.images, args.repeats, keep, Path(tmp) / model)
            results[model] = {"configs": configs}
            if model == "miniworld":
                results[model]["quality"] = judged = quality(configs, args.images)
                # The first seeds, and the seed whose two images differ most, so the grid hides no outlier.
                seeds = list(range(min(args.grid_seeds, args.images)))
                seeds += [seed for seed in [judged["pixel_mad_same_seed_worst_seed"]] if seed not in seeds]
                results[model]["grid"] = str(write_grid(configs, seeds, grid_path))

    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "prompt": PROMPT,
                                               "models": results}, indent=2))


if __name__ == "__main__":
    main()
