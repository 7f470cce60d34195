"""Training speed and peak memory with the latent and prompt caches against `--no-cache`, in one run.

    python benchmarks/train_speed.py [--steps 24] [--threads 2] [--json results.json] [--quick]

Two models, both trained by the normal `train` with prior preservation (batch 1 + 1, centre crops, the text
encoder frozen):
- `miniworld`: the shipped miniature Stable Diffusion at 64 px;
- `sd-shaped`: Stable Diffusion 1.5's architecture (four UNet levels, two ResNets and transformers per level,
  a four-level VAE) at a tenth of its width, random weights, 256 px. Speed does not depend on weight values,
  and at these shapes the VAE encode is a share of the step like SD 1.5's at 512 px.
Each configuration trains in its own process, so its peak resident memory is its own. A step's time is the
difference of consecutive `seconds` in metrics.jsonl; the table shows medians after two warm-up steps. Each
configuration runs `--repeats` times, alternating with the other (a round: one uncached run, then one cached);
the speed-up is the median of the rounds' speed-ups, since a machine whose speed drifts over minutes slows both
runs of a round alike (compare ratios, not times across runs). The wall time includes the cache's up-front
encoding.

On a GPU (`torch.cuda.is_available()`; not in `--quick`) a second table trains full-size architectures built
from their reference configs (`write_reference_configs`) with random weights (`build_random_pipeline`): SD 1.5
at 512 px, full fine-tune (8-bit AdamW, fp16, gradient checkpointing) and LoRA rank 16 (fp16, checkpointing),
and SDXL at 1024 px, LoRA rank 16 (fp16, checkpointing); each with the cache and with `--no-cache`. It gives
the median ms/step, the peak of `torch.cuda.max_memory_allocated()` (each configuration in its own process)
and, beside it, `--estimate-memory`'s peak for the same settings (`dreambooth.memory.estimate_run`). Every
configuration reads the loss each step (`log_every=1`), so a step's time is the GPU's, not the time to queue
its kernels. The hidden `--gpu-models-on-cpu` runs that same code path on the CPU with miniature stand-ins of
the references (their configs shrunk, 32 px; fp16 becomes bf16, and 8-bit AdamW becomes AdamW without
bitsandbytes), the peak then being the process's resident memory: it tests the path, it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from random_models import (SD_SHAPED_RESOLUTION, STAND_IN_RESOLUTION, build_random_pipeline, build_sd_shaped,
                           write_reference)

MODELS = {"miniworld": 64, "sd-shaped": SD_SHAPED_RESOLUTION}
WARM_UP_STEPS = 2  # left out of the median step time
PEAKS = ("peak_bytes", "peak_reserved_bytes", "estimate_peak_bytes")  # bytes; None where not measured

# The GPU table: name -> (reference configs, resolution, TrainConfig settings). Random weights: speed and
# memory do not depend on weight values.
CHECKPOINTED_FP16 = dict(mixed_precision="fp16", gradient_checkpointing=True)
GPU_CONFIGS = {
    "sd15-full": ("sd15", 512, dict(optimizer="adamw8bit", **CHECKPOINTED_FP16)),
    "sd15-lora": ("sd15", 512, dict(lora_rank=16, **CHECKPOINTED_FP16)),
    "sdxl-lora": ("sdxl", 1024, dict(lora_rank=16, **CHECKPOINTED_FP16)),
}


def device_settings(settings: dict, stand_in: bool) -> dict:
    """A GPU configuration's settings as this machine runs them: on the CPU (the stand-in) fp16 becomes bf16
    (`make_accelerator` refuses fp16 there) and 8-bit AdamW becomes AdamW where bitsandbytes is missing."""
    import importlib.util

    if not stand_in:
        return dict(settings)
    changed = dict(settings)
    if changed.get("mixed_precision") == "fp16":
        changed["mixed_precision"] = "bf16"
    if changed.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        changed["optimizer"] = "adamw"
    return changed


def describe_settings(settings: dict) -> str:
    """E.g. "full adamw8bit fp16 ckpt", "LoRA r16 adamw fp16 ckpt"."""
    kind = f"LoRA r{settings['lora_rank']}" if settings.get("lora_rank") else "full"
    words = [kind, settings.get("optimizer", "adamw"), settings.get("mixed_precision", "no").replace("no", "fp32")]
    return " ".join(words + (["ckpt"] if settings.get("gradient_checkpointing") else []))


def write_images(folder: Path, count: int, size: int, seed: int) -> None:
    """Square photos at the training size (one crop each, as most DreamBooth sets are prepared)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top : top + size // 2, left : left + size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"image{index:03d}.png")


def train_config(name: str, cache: bool, steps: int, root: Path, stand_in: bool = False):
    """The TrainConfig of one configuration: prior preservation (batch 1 + 1), centre crops, the loss read every
    step. The CPU table's models at learning rate 1e-4; a GPU configuration with its settings (and the learning
    rate they default to) on `root`/pipeline."""
    from dreambooth.config import TrainConfig

    if name in GPU_CONFIGS:
        _, resolution, settings = GPU_CONFIGS[name]
        model, resolution = str(root / "pipeline"), STAND_IN_RESOLUTION if stand_in else resolution
        settings = device_settings(settings, stand_in)
    else:
        model = "miniworld" if name == "miniworld" else str(root / "pipeline")
        resolution, settings = MODELS[name], dict(learning_rate=1e-4)
    folder = root / f"cache-{cache}"
    return TrainConfig(
        model=model, instance_dir=str(folder / "instance"), instance_prompt="a photo of miru cat",
        class_dir=str(folder / "classes"), class_prompt="a photo of a cat", num_class_images=10,
        output=str(folder / f"run-{name}-{os.getpid()}"), resolution=resolution, max_train_steps=steps,
        center_crop=True, cache=cache, seed=0, log_every=1, **settings)


def train_one(config, estimate: bool = False) -> dict:
    """Train one configuration in this process; return its step times, peak memory and the seconds the VAE
    spent encoding (so the table can show the encoder's share of an uncached step); with `estimate`, also
    `--estimate-memory`'s peak for the same settings. The peak is `torch.cuda.max_memory_allocated()` on a
    GPU, else the process's resident memory."""
    import torch
    from diffusers import AutoencoderKL

    from dreambooth.train import train

    encoding = []
    encode = AutoencoderKL.encode

    def timed_encode(self, *args, **kwargs):
        started = time.perf_counter()
        output = encode(self, *args, **kwargs)
        encoding.append(time.perf_counter() - started)
        return output

    AutoencoderKL.encode = timed_encode
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    paths = train(config)
    wall = time.perf_counter() - started  # everything train does, the cache's up-front encoding included
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    shutil.rmtree(paths.root)  # a full fine-tune saves a whole pipeline: 4.3 GB for SD 1.5
    seconds = [record["seconds"] for record in records]
    step_times = [later - earlier for earlier, later in zip(seconds, seconds[1:])]
    result = {"median_step_seconds": statistics.median(step_times[WARM_UP_STEPS:] or step_times[-1:]),
              "wall_seconds": wall, "losses": [r["loss"] for r in records], "vae_seconds": sum(encoding),
              "train_seconds": seconds[-1], "peak_rss_mb": rss / 2**20,
              "peak_bytes": torch.cuda.max_memory_allocated() if cuda else rss,
              "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
              "peak_kind": "cuda max_memory_allocated" if cuda else "process RSS"}
    if estimate:
        from dreambooth.memory import estimate_run

        result["estimate_peak_bytes"] = estimate_run(config).peak
    return result


def combine(runs: list[dict]) -> dict:
    """Repeated runs of one configuration: medians of their times, the highest peak, the first run's losses
    (every run of a configuration computes the same numbers)."""
    return {"median_step_seconds": statistics.median(run["median_step_seconds"] for run in runs),
            "wall_seconds": statistics.median(run["wall_seconds"] for run in runs),
            "vae_share": statistics.median(run["vae_seconds"] / run["train_seconds"] for run in runs),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs), "losses": runs[0]["losses"], "runs": len(runs),
            **{key: max(run[key] for run in runs) for key in PEAKS if runs[0].get(key) is not None},
            "peak_kind": runs[0]["peak_kind"]}


def run_configuration(name: str, cache: bool, steps: int, threads: int, root: Path, stand_in: bool = False) -> dict:
    command = [sys.executable, __file__, "--one", name, "--cache" if cache else "--no-cache", "--steps", str(steps),
               "--threads", str(threads), "--root", str(root)] + (["--gpu-models-on-cpu"] if stand_in else [])
    # The stand-in runs on the CPU even on a GPU machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if stand_in else None
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{name} ({'cache' if cache else 'no cache'}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(name: str, root: Path, resolution: int, steps: int, threads: int, repeats: int,
            stand_in: bool = False) -> dict:
    """One configuration with the cache and without, alternating (A B A B ...) over `repeats` rounds, so a
    machine that slows down over the run slows both; `root`/pipeline is its model where it needs one."""
    write_images(root / "instance", 5, resolution, seed=1)
    write_images(root / "classes", 10, resolution, seed=2)
    for cache in (False, True):
        for folder in ("instance", "classes"):  # each worker trains in its own folder
            target = root / f"cache-{cache}" / folder
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / folder, target)
    rounds = [{cache: run_configuration(name, cache, steps, threads, root, stand_in) for cache in (False, True)}
              for _ in range(repeats)]
    combined = {cache: combine([one[cache] for one in rounds]) for cache in (False, True)}
    # The speed-up of each round (an uncached run, then a cached one, seconds apart): this machine's speed
    # drifts by 20% over minutes, which moves both runs of a round alike but not runs minutes apart.
    combined["round_speedups"] = [one[False]["median_step_seconds"] / one[True]["median_step_seconds"]
                                  for one in rounds]
    return combined


def measure_gpu_models(names: list[str], folder: Path, steps: int, threads: int, repeats: int,
                       stand_in: bool = False) -> dict:
    """The GPU table: each configuration's random-weight pipeline built once per reference (and removed once
    its configurations have run: SDXL's takes 14 GB of disk). A configuration that fails (out of memory on a
    small GPU, no bitsandbytes for 8-bit AdamW) is recorded with its error; the others still run."""
    results = {}
    for reference_name in dict.fromkeys(GPU_CONFIGS[name][0] for name in names):
        root = folder / reference_name
        reference = write_reference(root / "reference", reference_name, stand_in)
        build_random_pipeline(reference, root / "pipeline")
        for name in (name for name in names if GPU_CONFIGS[name][0] == reference_name):
            _, resolution, settings = GPU_CONFIGS[name]
            resolution = STAND_IN_RESOLUTION if stand_in else resolution
            results[name] = {"reference": reference_name, "stand_in": stand_in, "resolution": resolution,
                             "settings": device_settings(settings, stand_in)}
            try:
                runs = measure(name, root, resolution, steps, threads, repeats, stand_in)
            except RuntimeError as error:
                results[name]["error"] = str(error).strip().splitlines()[-1]
                continue
            results[name].update({str(k): v for k, v in runs.items()})
        shutil.rmtree(root)
    return results


def print_gpu_table(results: dict) -> None:
    gib = 2**30
    stand_in = any(result["stand_in"] for result in results.values())
    print(f"\n{'configuration':<13} {'model':<11} {'settings':<26} {'no-cache ms/step':>17} {'cache ms/step':>14} "
          f"{'speed-up':>9} {'no-cache peak / est. GiB':>25} {'cache peak / est. GiB':>22} {'cache peak/est.':>16}")
    for name, result in results.items():
        model = f"{result['reference']}{' tiny' if result['stand_in'] else ''} {result['resolution']}"
        print(f"{name:<13} {model:<11} {describe_settings(result['settings']):<26} ", end="")
        if "error" in result:
            print(f"FAILED: {result['error']}")
            continue
        plain, cached = result["False"], result["True"]
        peaks = [f"{run['peak_bytes'] / gib:.2f} / {run['estimate_peak_bytes'] / gib:.2f}" for run in (plain, cached)]
        print(f"{plain['median_step_seconds'] * 1e3:>17.1f} {cached['median_step_seconds'] * 1e3:>14.1f} "
              f"{plain['median_step_seconds'] / cached['median_step_seconds']:>8.2f}x {peaks[0]:>25} {peaks[1]:>22} "
              f"{cached['peak_bytes'] / cached['estimate_peak_bytes']:>15.2f}x")
    kind = next((result["True"]["peak_kind"] for result in results.values() if "True" in result), "none measured")
    print(f"peak: {kind}; est.: --estimate-memory's peak for the same settings"
          + (" (stand-in on the CPU: the peak is the process's RSS, no check of the estimate)" if stand_in else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS), help="models to measure")
    parser.add_argument("--gpu-models", nargs="*", choices=list(GPU_CONFIGS), default=list(GPU_CONFIGS),
                        help="full-size configurations to measure on a GPU (none without one)")
    parser.add_argument("--quick", action="store_true",
                        help="4 steps of the miniature world only (CI; no full-size models, even on a GPU)")
    parser.add_argument("--gpu-models-on-cpu", action="store_true", help=argparse.SUPPRESS)  # tests: the stand-in
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.one:  # a worker: one configuration
        config = train_config(args.one, args.cache, args.steps, Path(args.root), args.gpu_models_on_cpu)
        print(json.dumps(train_one(config, estimate=args.one in GPU_CONFIGS)))
        return

    names = ["miniworld"] if args.quick else args.models
    steps = 4 if args.quick else args.steps
    args.repeats = 1 if args.quick else args.repeats
    gpu_names = args.gpu_models if args.gpu_models_on_cpu or (torch.cuda.is_available() and not args.quick) else []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            root = Path(tmp) / name
            if name == "sd-shaped":
                build_sd_shaped(root)
            results[name] = measure(name, root, MODELS[name], steps, args.threads, args.repeats)
        gpu_results = measure_gpu_models(gpu_names, Path(tmp) / "gpu", steps, args.threads, args.repeats,
                                         args.gpu_models_on_cpu)

    if results:
        print(f"{'model':<11} {'no-cache ms/step':>17} {'VAE share':>9} {'cache ms/step':>14} {'speed-up':>9} "
              f"{'wall s (no / cache)':>20} {'no-cache peak MB':>17} {'cache peak MB':>14} {'loss gap':>9}")
    for name, runs in results.items():
        plain, cached = runs[False], runs[True]
        gap = max(abs(a - b) / abs(b) for a, b in zip(cached["losses"], plain["losses"]))
        walls = f"{plain['wall_seconds']:.1f} / {cached['wall_seconds']:.1f}"
        print(f"{name:<11} {plain['median_step_seconds'] * 1e3:>17.1f} {plain['vae_share']:>9.0%} "
              f"{cached['median_step_seconds'] * 1e3:>14.1f} "
              f"{statistics.median(runs['round_speedups']):>8.2f}x {walls:>20} "
              f"{plain['peak_rss_mb']:>17.0f} {cached['peak_rss_mb']:>14.0f} {gap:>9.1e}")
    if gpu_results:
        print_gpu_table(gpu_results)
    if args.json:
        written = {name: {str(k): v for k, v in runs.items()} for name, runs in results.items()}
        if gpu_results:
            written["gpu_models"] = gpu_results
        Path(args.json).write_text(json.dumps(written, indent=2))
    if any("error" in result for result in gpu_results.values()):
        sys.exit("a GPU configuration failed (see its row)")


if __name__ == "__main__":
    main()
