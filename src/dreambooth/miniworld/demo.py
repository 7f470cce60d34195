"""`dreambooth demo`: the whole DreamBooth story in the miniature world, on a laptop CPU in minutes.

Renders miru's instance photos, lets `train` generate class images with the base model and fine-tune
with prior preservation, renders "a photo of miru cat <scene>" over a grid, renders the base model's
best effort ("a photo of a white cat <scene>") beside it, and measures both with the world-CLIP.
Every step is the normal package code; only the model and the photos come from the miniature world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth.config import DemoConfig, GenerateConfig, TrainConfig
from dreambooth.errors import UserError
from dreambooth.files import atomic_write_text, move_aside, read_jsonl
from dreambooth.miniworld import weights_available, world

SCENES = ("by the sea", "in the forest", "in the snow", "at night")
INSTANCE_PROMPT = "a photo of miru cat"
CLASS_PROMPT = "a photo of a cat"
DEMO_ENTRIES = ["instance", "class-images", "run", "samples", "baseline", "report.md", "numbers.json"]


def subject_prompts() -> list[str]:
    return [f"{INSTANCE_PROMPT} {scene}" for scene in SCENES]


def baseline_prompts() -> list[str]:
    """The closest the base model can get without DreamBooth: it knows white cats, not miru."""
    return [f"a photo of a white cat {scene}" for scene in SCENES]


def train_settings(config: DemoConfig, output: Path, prior: bool = True) -> TrainConfig:
    """The demo's training run: the package's own trainer on the miniature base model."""
    return TrainConfig(
        model="miniworld", instance_dir=str(output / "instance"), instance_prompt=INSTANCE_PROMPT,
        output=str(output / ("run" if prior else "run-no-prior")),
        class_dir=str(output / "class-images") if prior else None, class_prompt=CLASS_PROMPT if prior else None,
        num_class_images=config.num_class_images, class_image_steps=config.sampling_steps[0],
        class_image_guidance=config.guidance[0], class_image_batch_size=25, class_image_scheduler="ddim",
        resolution=world.SIZE, learning_rate=config.learning_rate, max_train_steps=config.max_train_steps,
        train_batch_size=config.train_batch_size, lr_scheduler="constant", seed=config.seed,
    )


def run_demo(config: DemoConfig) -> Path:
    """Run the demo into `config.output`; return the report's path."""
    from dreambooth.sampling import generate
    from dreambooth.train import train

    if not weights_available():
        raise UserError("the miniature world's weights are not installed; run `python -m dreambooth.miniworld.pretrain`")
    output = Path(config.output)
    claim_demo_folder(output, config.overwrite)

    print("demo 1/5: rendering miru's instance photos")
    world.save_instance_images(output / "instance", n=config.num_instance_images, seed=config.seed)

    print("demo 2/5: class images from the base model, then DreamBooth training with prior preservation")
    run = train(train_settings(config, output))

    print("demo 3/5: rendering miru in new scenes")
    sampling = dict(steps=config.sampling_steps, guidance=config.guidance, seeds=list(range(config.num_seeds)),
                    scheduler=["ddim"], batch_size=16)
    generate(GenerateConfig(model=str(run.root), prompt=subject_prompts() + [CLASS_PROMPT],
                            output=str(output / "samples"), **sampling))

    print("demo 4/5: the base model's best effort, for comparison")
    generate(GenerateConfig(model="miniworld", prompt=baseline_prompts() + [CLASS_PROMPT],
                            output=str(output / "baseline"), **sampling))

    print("demo 5/5: measuring with the world-CLIP")
    numbers = {"tuned": measure(output / "samples", output / "instance"),
               "base": measure(output / "baseline", output / "instance"),
               "settings": {k: v for k, v in vars(config).items() if k != "output"}}
    atomic_write_text(output / "numbers.json", json.dumps(numbers, indent=2))
    report = write_demo_report(output, numbers, run)
    print(f"demo: report {report}")
    return report


def claim_demo_folder(output: Path, overwrite: bool) -> None:
    if not any((output / name).exists() for name in DEMO_ENTRIES):
        return
    if not overwrite:
        raise UserError(f"--output {output}: holds an earlier demo; pick another folder or pass --overwrite")
    print(f"--overwrite: moved the earlier demo to {move_aside(output, DEMO_ENTRIES)}")


def measure(samples: Path, instance_dir: Path) -> dict[str, Any]:
    """Subject fidelity, prompt fidelity, marking rate, PRES and DIV of a generate output, per setting."""
    from PIL import Image

    from dreambooth.metrics import evaluate_samples, load_embedding_models
    from dreambooth.miniworld import measure as judge

    clip = load_embedding_models("miniworld", "miniworld")
    rows = evaluate_samples(samples, instance_dir, clip, class_prompt=CLASS_PROMPT)
    world_clip = judge.load_world_clip()
    manifest = read_jsonl(samples / "manifest.jsonl")
    result: dict[str, Any] = {}
    for setting in sorted({(r["steps"], r["guidance"]) for r in manifest}):
        records = [r for r in manifest if (r["steps"], r["guidance"]) == setting and r["prompt"] != CLASS_PROMPT]
        images = [Image.open(samples / r["file"]).convert("RGB") for r in records]
        scenes = judge.zero_shot(world_clip, images)["scene"]
        markings = judge.detect_miru(world_clip, images)
        setting_rows = [r for r in rows if (r["steps"], r["guidance"]) == setting]
        result[f"steps {setting[0]}, guidance {setting[1]:g}"] = {
            "clip_i": mean(r["clip_i"] for r in setting_rows),
            "clip_t": mean(r["clip_t"] for r in setting_rows),
            "scene_accuracy": mean(float(s == r["prompt"].split(" cat ", 1)[1]) for s, r in zip(scenes, records)),
            "marking_rate": mean(float(m) for m in markings),
            "pres": setting_rows[0]["pres"] if setting_rows else None,
            "div": mean(r["div"] for r in setting_rows if r["div"] is not None),
            "n": len(records),
        }
    return result


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def write_demo_report(output: Path, numbers: dict[str, Any], run) -> Path:
    """report.md: the grid, the loss curve and the numbers, tuned beside base."""
    metrics = read_jsonl(run.metrics)
    lines = [
        "# DreamBooth in the miniature world",
        "",
        f"Miru (a white cat with orange ears, a blue collar and a black tail, never seen by the base model) was "
        f"learned from {len(list((output / 'instance').glob('*.png')))} photos in {len(metrics)} steps "
        f"({metrics[-1]['seconds']:.0f} s of training; final loss {metrics[-1]['loss']:.3f}).",
        "",
        "## Miru in new scenes (fine-tuned model)",
        "",
        "![grid](samples/grid.png)",
        "",
        "## The base model asked for a white cat (no DreamBooth)",
        "",
        "![baseline](baseline/grid.png)",
        "",
        "## Numbers (world-CLIP)",
        "",
        "Subject fidelity is CLIP-I against the instance photos, prompt fidelity CLIP-T and the scene accuracy "
        "of zero-shot classification; the marking rate is the share of images in which all three of miru's "
        "markings are read; PRES compares \"a photo of a cat\" images with miru (lower: the class is kept); "
        "DIV is 1 - similarity between seeds of one prompt.",
        "",
        "| model | setting | CLIP-I | CLIP-T | scene acc. | marking rate | PRES | DIV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in ("tuned", "base"):
        for setting, values in numbers[model].items():
            cells = [f"{values[k]:.3f}" if values[k] is not None else "-" for k in
                     ("clip_i", "clip_t", "scene_accuracy", "marking_rate", "pres", "div")]
            lines.append(f"| {model} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "## Training loss", "", "![loss](run/loss.png)", "",
              "Reproduce: `dreambooth demo --output " + str(output) + " --overwrite`"]
    atomic_write_text(output / "report.md", "\n".join(lines) + "\n")
    return output / "report.md"
