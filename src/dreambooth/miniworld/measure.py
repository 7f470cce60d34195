"""Judge images of the world with the world-CLIP, and measure the shipped models.

    python -m dreambooth.miniworld.measure [--n 200] [--write]

Zero-shot classification enumerates full captions ("a photo of a {colour} {kind} {scene}") and
scores each attribute value by the log-sum-exp of the logits of the captions that name it, i.e. it
marginalises over the attributes not asked about. Markings are read the same way, over every
(ears, collar, tail) combination. With --write the numbers go to weights/MEASUREMENTS.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import WEIGHTS, base_model_path, world, world_clip_path

ATTRIBUTES = {"kind": world.KINDS, "colour": tuple(world.COLOURS), "scene": world.SCENES}
PARTS = ("ears", "collar", "tail")


@dataclass
class WorldClip:
    """The world-CLIP model, its tokenizer and a cache of text embeddings."""

    model: object
    tokenizer: object
    _text_cache: dict = field(default_factory=dict)


def load_world_clip(path: str | Path | None = None) -> WorldClip:
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path or world_clip_path())
    model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    return WorldClip(model, CLIPTokenizer.from_pretrained(path))


def as_pixels(images) -> torch.Tensor:
    """PIL images, a uint8 NHWC array or a list of arrays -> float NCHW in [-1, 1] at 64x64."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB").resize((world.SIZE, world.SIZE), Image.BICUBIC))
                        if isinstance(im, Image.Image) else np.asarray(im) for im in images])
    return torch.from_numpy(world.to_tensor_range(arr))


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


@torch.no_grad()
def image_embeddings(wc: WorldClip, images, batch: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings (CLIP-I and DIV are cosines of these)."""
    pixels = as_pixels(images)
    chunks = [_features(wc.model.get_image_features(pixel_values=pixels[i:i + batch]))
              for i in range(0, len(pixels), batch)]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def text_embeddings(wc: WorldClip, texts: list[str], batch: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings, cached per text (CLIP-T is a cosine of image and text)."""
    missing = [t for t in dict.fromkeys(texts) if t not in wc._text_cache]
    for i in range(0, len(missing), batch):
        part = missing[i:i + batch]
        ids = wc.tokenizer(part, padding="max_length", max_length=wc.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
        emb = torch.nn.functional.normalize(_features(wc.model.get_text_features(input_ids=ids)), dim=-1)
        wc._text_cache.update(zip(part, emb))
    return torch.stack([wc._text_cache[t] for t in texts])


def _marginal(logits: torch.Tensor, labels: list[tuple], position: int, values: tuple) -> torch.Tensor:
    """N x len(values) scores: log-sum-exp of the logits of captions whose label[position] is each value."""
    cols = []
    for v in values:
        idx = torch.tensor([i for i, lab in enumerate(labels) if lab[position] == v])
        cols.append(torch.logsumexp(logits[:, idx], dim=1))
    return torch.stack(cols, dim=1)


def zero_shot(wc: WorldClip, images, embeddings: torch.Tensor | None = None) -> dict[str, list[str]]:
    """Predicted kind, colour and scene of each image, by marginalising over all plain full captions."""
    labels = list(itertools.product(world.KINDS, world.COLOURS, world.SCENES))
    texts = [f"a photo of a {c} {k} {s}" for k, c, s in labels]
    img = embeddings if embeddings is not None else image_embeddings(wc, images)
    logits = wc.model.logit_scale.exp() * img @ text_embeddings(wc, texts).T
    return {name: [values[j] for j in _marginal(logits, labels, pos, values).argmax(1).tolist()]
            for pos, (name, values) in enumerate(ATTRIBUTES.items())}


def predict_markings(wc: WorldClip, images, kind: str = "cat", colour: str = "white",
                     embeddings: torch.Tensor | None = None) -> list[dict[str, str | None]]:
    """For images of a `colour` `kind`: the predicted colour (or None) of its ears, collar and tail."""
    options = (None, *world.MARKING_COLOURS)
    labels = list(itertools.product(options, options, options, world.SCENES))
    texts = []
    for ears, collar, tail, scene in labels:
        spec = world.SceneSpec(kind, colour, scene, 0, 0, 1, "standing", False, 0, ears, collar, tail)
        texts.append(world.full_caption(spec))
    img = embeddings if embeddings is not None else image_embeddings(wc, images)
    logits = wc.model.logit_scale.exp() * img @ text_embeddings(wc, texts).T
    preds = [_marginal(logits, labels, pos, options).argmax(1).tolist() for pos in range(3)]
    return [{p: options[preds[j][i]] for j, p in enumerate(PARTS)} for i in range(len(img))]


@torch.no_grad()
def detect_miru(wc: WorldClip, images, embeddings: torch.Tensor | None = None) -> list[bool]:
    """True where "a white cat with orange ears, a blue collar and a black tail" beats "a white cat"
    (each marginalised over scenes): the binary marking detector of the DreamBooth measurements."""
    plain = [f"a photo of a white cat {s}" for s in world.SCENES]
    miru = [world.full_caption(world.replace(world.SceneSpec("cat", "white", s, 0, 0, 1, "standing", False, 0),
                                              **world.MIRU_MARKINGS)) for s in world.SCENES]
    img = embeddings if embeddings is not None else image_embeddings(wc, images)
    logits = wc.model.logit_scale.exp() * img @ text_embeddings(wc, plain + miru).T
    k = len(world.SCENES)
    return (torch.logsumexp(logits[:, k:], 1) > torch.logsumexp(logits[:, :k], 1)).tolist()


def has_miru_markings(predictions: list[dict]) -> list[bool]:
    """True where all three of miru's markings were read off the image."""
    return [all(p[part] == world.MIRU_MARKINGS[part] for part in PARTS) for p in predictions]


# ----------------------------------------------------------------------------------------------
# The measurements of the shipped weights


def accuracy(pred: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(pred, truth)]))


def measure_world_clip(wc: WorldClip, n: int = 1000, seed: int = 1234) -> dict:
    """Zero-shot accuracy on freshly rendered ground truth, and miru's markings vs plain white cats."""
    rng = random.Random(seed)
    specs = [world.sample_spec(rng) for _ in range(n)]
    preds = zero_shot(wc, world.render_batch(specs))
    result = {f"{a}_accuracy": accuracy(preds[a], [getattr(s, a) for s in specs]) for a in ATTRIBUTES}
    miru = [world.miru_spec(rng, scene=rng.choice(world.SCENES)) for _ in range(100)]
    plain = [world.sample_spec(rng, kind="cat", colour="white") for _ in range(100)]
    miru_img, plain_img = world.render_batch(miru), world.render_batch(plain)
    result["miru_detected_on_miru"] = float(np.mean(detect_miru(wc, miru_img)))
    result["miru_detected_on_white_cats"] = float(np.mean(detect_miru(wc, plain_img)))
    # Stricter: every part's colour read correctly out of all 343 ear/collar/tail combinations.
    result["miru_parts_read_on_miru"] = float(np.mean(has_miru_markings(predict_markings(wc, miru_img))))
    result["miru_parts_read_on_white_cats"] = float(np.mean(has_miru_markings(predict_markings(wc, plain_img))))
    result["n"] = n
    return result


def load_base_pipeline(path: str | Path | None = None, scheduler: str = "ddim"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(Path(path or base_model_path())).to(torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance: float = 5.0,
             batch: int = 50) -> list[Image.Image]:
    images = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gen, height=world.SIZE, width=world.SIZE).images
    return images


def measure_base_model(pipe, wc: WorldClip, n: int = 200, seed: int = 0, steps: int = 25,
                       guidance: float = 5.0) -> tuple[dict, list[Image.Image]]:
    """Generate from n random full captions; the world-CLIP judges kind, colour and scene."""
    rng = random.Random(seed)
    specs = [world.sample_spec(rng) for _ in range(n)]
    images = generate(pipe, [world.caption_forms(s)[0] for s in specs], seed=seed, steps=steps, guidance=guidance)
    emb = image_embeddings(wc, images)
    preds = zero_shot(wc, images, embeddings=emb)
    result = {f"{a}_accuracy": accuracy(preds[a], [getattr(s, a) for s in specs]) for a in ATTRIBUTES}
    cats = generate(pipe, ["a photo of a white cat"] * 50, seed=seed + 10_000, steps=steps, guidance=guidance)
    result["miru_detected_on_white_cats"] = float(np.mean(detect_miru(wc, cats)))
    result.update(n=n, steps=steps, guidance_scale=guidance, scheduler="DDIM")
    return result, images


THRESHOLDS = {"world_clip": {"kind_accuracy": 0.98, "colour_accuracy": 0.98, "scene_accuracy": 0.98},
              "base_model": {"kind_accuracy": 0.90, "scene_accuracy": 0.90, "colour_accuracy": 0.80}}


def write_report(results: dict, folder: Path = WEIGHTS) -> None:
    (folder / "MEASUREMENTS.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Measurements of the shipped miniworld weights", "",
             "Written by `python -m dreambooth.miniworld.measure --write`. Thresholds from issue 3.", "",
             "| model | metric | measured | threshold | pass |", "|---|---|---|---|---|"]
    for model, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for k, v in metrics.items():
            if isinstance(v, float):
                thr = THRESHOLDS.get(model, {}).get(k)
                ok = "" if thr is None else ("yes" if v >= thr else "**no**")
                lines.append(f"| {model} | {k} | {v:.3f} | {'' if thr is None else thr} | {ok} |")
    for k in ("world_clip", "base_model"):
        extra = {a: b for a, b in results.get(k, {}).items() if not isinstance(b, float)}
        lines += ["", f"`{k}` settings: {json.dumps(extra)}"]
    (folder / "MEASUREMENTS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=None, help="diffusers folder (default: shipped)")
    parser.add_argument("--world-clip", type=Path, default=None, help="world-CLIP folder (default: shipped)")
    parser.add_argument("--n", type=int, default=200, help="generations judged")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--grid", type=Path, default=None, help="save the first 64 generations as a grid PNG")
    parser.add_argument("--write", action="store_true", help="write weights/MEASUREMENTS.{json,md}")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    wc = load_world_clip(args.world_clip)
    results = {"world_clip": measure_world_clip(wc)}
    print("world-CLIP on rendered ground truth:", json.dumps(results["world_clip"]), flush=True)
    base, images = measure_base_model(load_base_pipeline(args.pipeline), wc, n=args.n, steps=args.steps,
                                      guidance=args.guidance)
    results["base_model"] = base
    print("base model judged by world-CLIP:", json.dumps(base), flush=True)
    if args.grid:
        grid = Image.new("RGB", (8 * world.SIZE, 8 * world.SIZE))
        for i, im in enumerate(images[:64]):
            grid.paste(im, ((i % 8) * world.SIZE, (i // 8) * world.SIZE))
        grid.save(args.grid)
    failed = [f"{m}.{k} {results[m][k]:.3f} < {t}" for m, ts in THRESHOLDS.items() for k, t in ts.items()
              if results[m][k] < t]
    print("thresholds:", "all met" if not failed else "NOT met: " + "; ".join(failed))
    print(f"measured in {time.time() - t0:.0f}s")
    if args.write:
        write_report(results)


if __name__ == "__main__":
    main()
