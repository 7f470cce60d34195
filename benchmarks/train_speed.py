"""Training speed and peak memory with the latent and prompt caches against `--no-cache`, in one run.

    python benchmarks/train_speed.py [--steps 24] [--threads 2] [--json results.json] [--quick]

Two models, both trained by the normal `train` with prior preservation (batch 1 + 1, centre crops, the text
encoder frozen):
- `miniworld`: the shipped miniature Stable Diffusion at 64 px;
- `sd-shaped`: Stable Diffusion 1.5's architecture (four UNet levels, two ResNets and transformers per level,
  a four-level VAE) at a tenth of its width, random weights, 256 px. Speed does not depend on weight values,
  and at these shapes the VAE encode is a share of the step like SD 1.5's at 512 px.
Each configuration trains in its own process, so its peak resident memory is its own. A step's time is the
difference of consecutive `seconds` in metrics.jsonl; the table shows medians after two warm-up steps, and
ratios taken within this one run (machines are noisy: compare ratios, not times across runs). Each configuration
runs `--repeats` times, alternating with the other; the wall time includes the cache's up-front encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SD_SHAPED_RESOLUTION = 256
# Heads of 32 channels. SD 1.5 has 8 heads per level (of 40 to 160 channels); eight heads of 4 to 16 channels
# would make the CPU's attention kernel, not the model's shape, the bottleneck (2.4x slower steps).
ATTENTION_HEADS = (1, 2, 4, 4)
MODELS = {"miniworld": 64, "sd-shaped": SD_SHAPED_RESOLUTION}


def build_sd_shaped(folder: Path) -> Path:
    """SD 1.5's block structure at a tenth of its width (random weights), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreambooth.miniworld.components import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=ATTENTION_HEADS,
        norm_num_groups=32, sample_size=SD_SHAPED_RESOLUTION // 8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=SD_SHAPED_RESOLUTION)
    tokenizer_folder = folder / "_tokenizer"
    tokenizer: CLIPTokenizer = build_tokenizer(tokenizer_folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


def write_images(folder: Path, count: int, size: int, seed: int) -> None:
    """Square photos at the training size (one crop each, as most DreamBooth sets are prepared)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top : top + size // 2, left : left + size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"image{index:03d}.png")


def train_one(model: str, resolution: int, cache: bool, steps: int, root: Path) -> dict:
    """Train one configuration in this process; return its step times, peak memory and the seconds the VAE
    spent encoding (so the table can show the encoder's share of an uncached step)."""
    from diffusers import AutoencoderKL

    from dreambooth.config import TrainConfig
    from dreambooth.train import train

    encoding = []
    encode = AutoencoderKL.encode

    def timed_encode(self, *args, **kwargs):
        started = time.perf_counter()
        output = encode(self, *args, **kwargs)
        encoding.append(time.perf_counter() - started)
        return output

    AutoencoderKL.encode = timed_encode
    config = TrainConfig(
        model=model, instance_dir=str(root / "instance"), instance_prompt="a photo of miru cat",
        class_dir=str(root / "classes"), class_prompt="a photo of a cat", num_class_images=10,
        output=str(root / f"run-{cache}-{os.getpid()}"), resolution=resolution, max_train_steps=steps,
        learning_rate=1e-4, center_crop=True, cache=cache, seed=0)
    started = time.perf_counter()
    paths = train(config)
    wall = time.perf_counter() - started  # everything train does, the cache's up-front encoding included
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    seconds = [record["seconds"] for record in records]
    step_times = [later - earlier for earlier, later in zip(seconds, seconds[1:])][2:]
    return {"median_step_seconds": statistics.median(step_times), "wall_seconds": wall,
            "losses": [r["loss"] for r in records], "vae_seconds": sum(encoding), "train_seconds": seconds[-1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def combine(runs: list[dict]) -> dict:
    """Repeated runs of one configuration: medians of their times, the highest peak, the first run's losses
    (every run of a configuration computes the same numbers)."""
    return {"median_step_seconds": statistics.median(run["median_step_seconds"] for run in runs),
            "wall_seconds": statistics.median(run["wall_seconds"] for run in runs),
            "vae_share": statistics.median(run["vae_seconds"] / run["train_seconds"] for run in runs),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs), "losses": runs[0]["losses"], "runs": len(runs)}


def run_configuration(name: str, cache: bool, steps: int, threads: int, root: Path) -> dict:
    command = [sys.executable, __file__, "--one", name, "--cache" if cache else "--no-cache", "--steps", str(steps),
               "--threads", str(threads), "--root", str(root)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to measure")
    parser.add_argument("--quick", action="store_true", help="4 steps of the miniature world only (CI)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.one:  # a worker: one configuration
        root = Path(args.root)
        model = "miniworld" if args.one == "miniworld" else str(root / "pipeline")
        print(json.dumps(train_one(model, MODELS[args.one], args.cache, args.steps, root / f"cache-{args.cache}")))
        return

    names = ["miniworld"] if args.quick else args.models
    steps = 4 if args.quick else args.steps
    args.repeats = 1 if args.quick else args.repeats
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            root = Path(tmp) / name
            write_images(root / "instance", 5, MODELS[name], seed=1)
            write_images(root / "classes", 10, MODELS[name], seed=2)
            if name == "sd-shaped":
                build_sd_shaped(root)
            for cache in (False, True):
                for folder in ("instance", "classes"):  # each worker trains in its own folder
                    target = root / f"cache-{cache}" / folder
                    target.mkdir(parents=True, exist_ok=True)
                    for image in (root / folder).iterdir():
                        (target / image.name).write_bytes(image.read_bytes())
            # The configurations alternate (A B A B ...), so a machine that slows down over the run slows both.
            rounds = [{cache: run_configuration(name, cache, steps, args.threads, root) for cache in (False, True)}
                      for _ in range(args.repeats)]
            results[name] = {cache: combine([one[cache] for one in rounds]) for cache in (False, True)}

    print(f"{'model':<11} {'no-cache ms/step':>17} {'VAE share':>9} {'cache ms/step':>14} {'speed-up':>9} "
          f"{'wall s (no / cache)':>20} {'no-cache peak MB':>17} {'cache peak MB':>14} {'loss gap':>9}")
    for name, runs in results.items():
        plain, cached = runs[False], runs[True]
        gap = max(abs(a - b) / abs(b) for a, b in zip(cached["losses"], plain["losses"]))
        walls = f"{plain['wall_seconds']:.1f} / {cached['wall_seconds']:.1f}"
        print(f"{name:<11} {plain['median_step_seconds'] * 1e3:>17.1f} {plain['vae_share']:>9.0%} "
              f"{cached['median_step_seconds'] * 1e3:>14.1f} "
              f"{plain['median_step_seconds'] / cached['median_step_seconds']:>8.2f}x {walls:>20} "
              f"{plain['peak_rss_mb']:>17.0f} {cached['peak_rss_mb']:>14.0f} {gap:>9.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({name: {str(k): v for k, v in runs.items()}
                                               for name, runs in results.items()}, indent=2))


if __name__ == "__main__":
    main()
