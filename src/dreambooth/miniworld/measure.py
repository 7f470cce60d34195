"""Judge images of the world with the world-CLIP, and measure the shipped models.

    python -m dreambooth.miniworld.measure [--n 200] [--write]

Zero-shot classification enumerates full captions ("a photo of a {colour} {kind} {scene}") and
scores each attribute value by the log-sum-exp of the logits of the captions that name it, i.e. it
marginalises over the attributes not asked about. Markings are read the same way, over every
(ears, collar, tail) combination. With --write the numbers go to weights/MEASUREMENTS.{json,md}.

Built on the core like any user's evaluation: the world-CLIP is loaded and applied by `dreambooth.metrics`
(the `miniworld` name resolves through `dreambooth.aliases`), and images are made by
`dreambooth.sampling.render`, one seed per image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.errors import UserError
from dreambooth.files import atomic_write_text
from dreambooth.metrics import EmbeddingModels, image_embeddings, load_embedding_models, text_embeddings
from dreambooth.miniworld import ALIAS, WEIGHTS, world

ATTRIBUTES = {"kind": world.KINDS, "colour": tuple(world.COLOURS), "scene": world.SCENES}
PARTS = ("ears", "collar", "tail")
TEXT_BATCH = 512  # the marking captions number 2401: embedded in chunks to bound the attention's memory


def load_world_clip(name: str | Path = ALIAS, device: str | torch.device = "cpu") -> EmbeddingModels:
    """The world-CLIP (a registered name such as `miniworld`, or a folder) in both of metrics' roles, loaded once."""
    return load_embedding_models(str(name), str(name), device=device)


def embed_images(judge: EmbeddingModels, images) -> torch.Tensor:
    """World-CLIP image embeddings of PIL images or of a uint8 N x H x W x 3 array (world.render_batch)."""
    if isinstance(images, np.ndarray):
        images = [Image.fromarray(image) for image in images]
    return image_embeddings(judge, list(images), "clip", batch_size=256)


def caption_embeddings(judge: EmbeddingModels, captions: list[str]) -> torch.Tensor:
    """Text embeddings of the judge's fixed caption sets, computed once per judge: kept in its cache
    under ("text", caption), beside metrics' image entries."""
    todo = [c for c in dict.fromkeys(captions) if ("text", c) not in judge.cache]
    for start in range(0, len(todo), TEXT_BATCH):
        part = todo[start:start + TEXT_BATCH]
        judge.cache.update(zip((("text", c) for c in part), text_embeddings(judge, part)))
    return torch.stack([judge.cache[("text", c)] for c in captions])


def _logits(judge: EmbeddingModels, images, embeddings: torch.Tensor | None, captions: list[str]) -> torch.Tensor:
    """N images x len(captions): the world-CLIP's scaled cosine similarities, as in its contrastive training."""
    img = embeddings if embeddings is not None else embed_images(judge, images)
    return judge.clip.logit_scale.detach().exp().item() * img @ caption_embeddings(judge, captions).T


def _marginal(logits: torch.Tensor, labels: list[tuple], position: int, values: tuple) -> torch.Tensor:
    """N x len(values) scores: log-sum-exp of the logits of captions whose label[position] is each value."""
    cols = []
    for v in values:
        idx = torch.tensor([i for i, lab in enumerate(labels) if lab[position] == v])
        cols.append(torch.logsumexp(logits[:, idx], dim=1))
    return torch.stack(cols, dim=1)


def zero_shot(judge: EmbeddingModels, images, embeddings: torch.Tensor | None = None) -> dict[str, list[str]]:
    """Predicted kind, colour and scene of each image, by marginalising over all plain full captions."""
    labels = list(itertools.product(world.KINDS, world.COLOURS, world.SCENES))
    logits = _logits(judge, images, embeddings, [f"a photo of a {c} {k} {s}" for k, c, s in labels])
    return {name: [values[j] for j in _marginal(logits, labels, pos, values).argmax(1).tolist()]
            for pos, (name, values) in enumerate(ATTRIBUTES.items())}


def predict_markings(judge: EmbeddingModels, images, kind: str = "cat", colour: str = "white",
                     embeddings: torch.Tensor | None = None) -> list[dict[str, str | None]]:
    """For images of a `colour` `kind`: the predicted colour (or None) of its ears, collar and tail."""
    options = (None, *world.MARKING_COLOURS)
    labels = list(itertools.product(options, options, options, world.SCENES))
    texts = []
    for ears, collar, tail, scene in labels:
        spec = world.SceneSpec(kind, colour, scene, 0, 0, 1, "standing", False, 0, ears, collar, tail)
        texts.append(world.full_caption(spec))
    logits = _logits(judge, images, embeddings, texts)
    preds = [_marginal(logits, labels, pos, options).argmax(1).tolist() for pos in range(3)]
    return [{p: options[preds[j][i]] for j, p in enumerate(PARTS)} for i in range(len(logits))]


@torch.no_grad()
def detect_miru(judge: EmbeddingModels, images, embeddings: torch.Tensor | None = None) -> list[bool]:
    """True where "a white cat with orange ears, a blue collar and a black tail" beats "a white cat"
    (each marginalised over scenes): the binary marking detector of the DreamBooth measurements."""
    plain = [f"a photo of a white cat {s}" for s in world.SCENES]
    miru = [world.full_caption(world.replace(world.SceneSpec("cat", "white", s, 0, 0, 1, "standing", False, 0),
                                              **world.MIRU_MARKINGS)) for s in world.SCENES]
    logits = _logits(judge, images, embeddings, plain + miru)
    k = len(world.SCENES)
    return (torch.logsumexp(logits[:, k:], 1) > torch.logsumexp(logits[:, :k], 1)).tolist()


def has_miru_markings(predictions: list[dict]) -> list[bool]:
    """True where all three of miru's markings were read off the image."""
    return [all(p[part] == world.MIRU_MARKINGS[part] for part in PARTS) for p in predictions]


# ----------------------------------------------------------------------------------------------
# The measurements of the shipped weights


def accuracy(pred: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(pred, truth)]))


def measure_world_clip(judge: EmbeddingModels, n: int = 1000, seed: int = 1234) -> dict:
    """Zero-shot accuracy on freshly rendered ground truth, and miru's markings vs plain white cats."""
    rng = random.Random(seed)
    specs = [world.sample_spec(rng) for _ in range(n)]
    preds = zero_shot(judge, world.render_batch(specs))
    result = {f"{a}_accuracy": accuracy(preds[a], [getattr(s, a) for s in specs]) for a in ATTRIBUTES}
    miru = embed_images(judge, world.render_batch([world.miru_spec(rng, scene=rng.choice(world.SCENES))
                                                   for _ in range(100)]))
    plain = embed_images(judge, world.render_batch([world.sample_spec(rng, kind="cat", colour="white")
                                                    for _ in range(100)]))
    result["miru_detected_on_miru"] = float(np.mean(detect_miru(judge, None, embeddings=miru)))
    result["miru_detected_on_white_cats"] = float(np.mean(detect_miru(judge, None, embeddings=plain)))
    # Stricter: every part's colour read correctly out of all 343 ear/collar/tail combinations.
    for name, embeddings in (("miru", miru), ("white_cats", plain)):
        markings = predict_markings(judge, None, embeddings=embeddings)
        result[f"miru_parts_read_on_{name}"] = float(np.mean(has_miru_markings(markings)))
    result["n"] = n
    return result


def load_base_pipeline(model: str | Path = ALIAS, device: str | torch.device = "cpu"):
    """The base model (a registered name such as `miniworld`, or a folder) in float32, as `generate` loads it."""
    from dreambooth.models import load_pipeline, resolve_model, without_safety_checker

    source = resolve_model(str(model))
    return load_pipeline(source, torch_dtype=torch.float32, **without_safety_checker(source)).to(device)


def measure_base_model(pipeline, judge: EmbeddingModels, n: int = 200, seed: int = 0, steps: int = 25,
                       guidance: float = 5.0) -> tuple[dict, list[Image.Image]]:
    """Generate from n random full captions; the world-CLIP judges kind, colour and scene.

    Image i is rendered with seed + i (the white cats with seed + 10000 + i), one seed per image as
    `dreambooth generate` does, so the numbers do not depend on how many images share a batch."""
    from dreambooth.sampling import SamplingSetting, render

    setting = SamplingSetting(steps, guidance, "ddim")
    size = dict(height=world.SIZE, width=world.SIZE, batch_size=50)
    rng = random.Random(seed)
    specs = [world.sample_spec(rng) for _ in range(n)]
    images = render(pipeline, [world.caption_forms(s)[0] for s in specs], [seed + i for i in range(n)], setting, **size)
    cats = render(pipeline, ["a photo of a white cat"] * 50, [seed + 10_000 + i for i in range(50)], setting, **size)
    preds = zero_shot(judge, images)
    result = {f"{a}_accuracy": accuracy(preds[a], [getattr(s, a) for s in specs]) for a in ATTRIBUTES}
    result["miru_detected_on_white_cats"] = float(np.mean(detect_miru(judge, cats)))
    result.update(n=n, steps=steps, guidance_scale=guidance, scheduler="DDIM")
    return result, images


THRESHOLDS = {"world_clip": {"kind_accuracy": 0.98, "colour_accuracy": 0.98, "scene_accuracy": 0.98},
              "base_model": {"kind_accuracy": 0.90, "scene_accuracy": 0.90, "colour_accuracy": 0.80}}


SETTINGS = ("n", "steps", "guidance_scale", "scheduler")  # how a measurement was taken, not what it measured


def write_report(results: dict, folder: Path = WEIGHTS) -> None:
    """MEASUREMENTS.json (the numbers) and MEASUREMENTS.md (a table of them against THRESHOLDS)."""
    atomic_write_text(folder / "MEASUREMENTS.json", json.dumps(results, indent=2) + "\n")
    lines = ["# Measurements of the shipped miniworld weights", "",
             "Written by `python -m dreambooth.miniworld.measure --write`. Thresholds from issue 3.", "",
             "| model | metric | measured | threshold | pass |", "|---|---|---|---|---|"]
    for model, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for k, v in metrics.items():
            if k not in SETTINGS:
                thr = THRESHOLDS.get(model, {}).get(k)
                ok = "" if thr is None else ("yes" if v >= thr else "**no**")
                lines.append(f"| {model} | {k} | {v:.3f} | {'' if thr is None else thr} | {ok} |")
    for k in ("world_clip", "base_model"):
        extra = {a: b for a, b in results.get(k, {}).items() if a in SETTINGS}
        lines += ["", f"`{k}` settings: {json.dumps(extra)}"]
    atomic_write_text(folder / "MEASUREMENTS.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=ALIAS,
                        help="base model: diffusers folder or model name (default: shipped)")
    parser.add_argument("--world-clip", default=ALIAS, help="world-CLIP folder or model name (default: shipped)")
    parser.add_argument("--n", type=int, default=200, help="generations judged")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--grid", type=Path, default=None, help="save the first 64 generations as a grid PNG")
    parser.add_argument("--write", action="store_true", help="write weights/MEASUREMENTS.{json,md}")
    args = parser.parse_args(argv)
    try:
        run_measurements(args)
    except UserError as error:  # a missing or unloadable model: one line, as from the dreambooth command
        parser.exit(2, f"measure: error: {error}\n")


def run_measurements(args: argparse.Namespace) -> None:
    """Measure the world-CLIP, then the base model judged by it; print, and write the report with --write."""
    torch.set_num_threads(2)
    t0 = time.time()
    judge = load_world_clip(args.world_clip)
    results = {"world_clip": measure_world_clip(judge)}
    print("world-CLIP on rendered ground truth:", json.dumps(results["world_clip"]), flush=True)
    base, images = measure_base_model(load_base_pipeline(args.pipeline), judge, n=args.n, steps=args.steps,
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
