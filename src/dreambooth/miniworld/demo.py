"""`dreambooth demo`: the whole DreamBooth story in the miniature world, on a laptop CPU in minutes.

Renders miru's instance photos (and masks of miru in them), lets `train` generate class images with
the base model and fine-tune with prior preservation, renders "a photo of miru cat <scene>" over a grid,
does the same without prior preservation (the paper's Table 3 in miniature), renders the base model's
best effort ("a photo of a white cat <scene>") beside them, and measures all three with the world-CLIP.
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
# The photos are captioned with where they were taken, as practitioners do, so the room is put on the
# words "in a room" and not on "miru" (without it, "miru cat in the snow" came out in the room).
INSTANCE_CAPTION = f"{INSTANCE_PROMPT} in a room"
IDENTIFIER = "miru"
CLASS_PROMPT = "a photo of a cat"
DEMO_ENTRIES = ["instance", "instance-masks", "class-images", "run", "run-no-prior", "samples", "samples-no-prior",
                "baseline", "report.md", "numbers.json"]
MODELS = {  # numbers.json key -> what the row is
    "tuned": "DreamBooth with prior preservation",
    "no_prior": "DreamBooth without prior preservation",
    "base": "base model, \"a photo of a white cat <scene>\"",
}
METRICS = ("clip_i", "clip_t", "scene_accuracy", "marking_rate", "pres", "div")
MIN_SCENE_ACCURACY = 0.8  # issue 3: fine-tuning may not cost the prompt its scene


def subject_prompts() -> list[str]:
    return [f"{INSTANCE_PROMPT} {scene}" for scene in SCENES]


def baseline_prompts() -> list[str]:
    """The closest the base model can get without DreamBooth: it knows white cats, not miru."""
    return [f"a photo of a white cat {scene}" for scene in SCENES]


def train_settings(config: DemoConfig, output: Path, prior: bool = True) -> TrainConfig:
    """The demo's training run: the package's own trainer on the miniature base model."""
    return TrainConfig(
        model="miniworld", instance_dir=str(output / "instance"), instance_prompt=INSTANCE_CAPTION,
        instance_mask_dir=str(output / "instance-masks"), mask_background_weight=config.mask_background_weight,
        output=str(output / ("run" if prior else "run-no-prior")),
        class_dir=str(output / "class-images") if prior else None, class_prompt=CLASS_PROMPT if prior else None,
        num_class_images=config.num_class_images, class_image_steps=config.sampling_steps[0],
        class_image_guidance=config.guidance[0], class_image_batch_size=25, class_image_scheduler="ddim",
        resolution=world.SIZE, learning_rate=config.learning_rate, max_train_steps=config.max_train_steps,
        train_batch_size=config.train_batch_size, train_text_encoder=config.train_text_encoder,
        # A tenth of the UNet's rate: at the same rate "miru" swallowed the scene words (every image a room).
        text_encoder_learning_rate=config.learning_rate / 10,
        token_embedding_learning_rate=config.token_embedding_learning_rate if config.train_text_encoder else None,
        identifier=IDENTIFIER,
        lr_scheduler="constant", seed=config.seed,
    )


def run_demo(config: DemoConfig) -> Path:
    """Run the demo into `config.output`; return the report's path."""
    from dreambooth.sampling import generate
    from dreambooth.train import train

    if not weights_available():
        raise UserError("the miniature world's weights are not installed; run `python -m dreambooth.miniworld.pretrain`")
    output = Path(config.output)
    claim_demo_folder(output, config.overwrite)
    total = 6 if config.compare_without_prior else 5
    stage = iter(range(1, total + 1))
    sampling = dict(steps=config.sampling_steps, guidance=config.guidance, seeds=list(range(config.num_seeds)),
                    scheduler=["ddim"], batch_size=16)

    print(f"demo {next(stage)}/{total}: rendering miru's instance photos and masks")
    world.save_instance_images(output / "instance", n=config.num_instance_images, seed=config.seed,
                               mask_folder=output / "instance-masks")

    print(f"demo {next(stage)}/{total}: class images from the base model, then DreamBooth with prior preservation")
    run = train(train_settings(config, output))
    generate(GenerateConfig(model=str(run.root), prompt=subject_prompts() + [CLASS_PROMPT],
                            output=str(output / "samples"), **sampling))
    samples = {"tuned": output / "samples"}

    if config.compare_without_prior:
        print(f"demo {next(stage)}/{total}: the same fine-tuning without prior preservation, for comparison")
        run_no_prior = train(train_settings(config, output, prior=False))
        generate(GenerateConfig(model=str(run_no_prior.root), prompt=subject_prompts() + [CLASS_PROMPT],
                                output=str(output / "samples-no-prior"), **sampling))
        samples["no_prior"] = output / "samples-no-prior"

    print(f"demo {next(stage)}/{total}: the base model's best effort, for comparison")
    generate(GenerateConfig(model="miniworld", prompt=baseline_prompts() + [CLASS_PROMPT],
                            output=str(output / "baseline"), **sampling))
    samples["base"] = output / "baseline"

    print(f"demo {next(stage)}/{total}: measuring with the world-CLIP")
    judges = load_judges()
    numbers: dict[str, Any] = {model: measure(folder, output / "instance", judges) for model, folder in samples.items()}
    numbers["checks"] = checks(numbers)
    numbers["settings"] = {k: v for k, v in vars(config).items() if k != "output"}
    atomic_write_text(output / "numbers.json", json.dumps(numbers, indent=2))

    print(f"demo {next(stage)}/{total}: writing the report")
    report = write_demo_report(output, numbers, run)
    for check in numbers["checks"]:
        print(f"  {'yes' if check['passed'] else 'NO '}  {check['claim']}: {check['measured']}")
    print(f"demo: report {report}")
    return report


def claim_demo_folder(output: Path, overwrite: bool) -> None:
    if not any((output / name).exists() for name in DEMO_ENTRIES):
        return
    if not overwrite:
        raise UserError(f"--output {output}: holds an earlier demo; pick another folder or pass --overwrite")
    print(f"--overwrite: moved the earlier demo to {move_aside(output, DEMO_ENTRIES)}")


def measure(samples: Path, instance_dir: Path, judges: tuple) -> dict[str, Any]:
    """Subject fidelity, prompt fidelity, marking rate, PRES and DIV of a generate output: one entry per
    sampling setting and their mean under "all settings"."""
    from PIL import Image

    from dreambooth.metrics import evaluate_samples
    from dreambooth.miniworld import measure as judge

    embedding_models, world_clip = judges
    rows = evaluate_samples(samples, instance_dir, embedding_models, class_prompt=CLASS_PROMPT)
    manifest = read_jsonl(samples / "manifest.jsonl")
    result: dict[str, Any] = {}
    for setting in sorted({(r["steps"], r["guidance"]) for r in manifest}):
        records = [r for r in manifest if (r["steps"], r["guidance"]) == setting and r["prompt"] != CLASS_PROMPT]
        images = [Image.open(samples / r["file"]).convert("RGB") for r in records]
        embeddings = judge.image_embeddings(world_clip, images)
        read = judge.zero_shot(world_clip, images, embeddings=embeddings)
        scenes = read["scene"]
        # The marking detector alone also fires on off-white cats; miru is a white cat with markings.
        detected = judge.detect_miru(world_clip, images, embeddings=embeddings)
        markings = [m and colour == "white" for m, colour in zip(detected, read["colour"])]
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
    per_setting = list(result.values())
    result["all settings"] = {k: mean(v[k] for v in per_setting) for k in METRICS}
    result["all settings"]["n"] = sum(v["n"] for v in per_setting)
    return result


def load_judges() -> tuple:
    """The world-CLIP twice over: as the metrics module's embedding models and as the zero-shot judge."""
    from dreambooth.metrics import load_embedding_models
    from dreambooth.miniworld import measure as judge

    return load_embedding_models("miniworld", "miniworld"), judge.load_world_clip()


def checks(numbers: dict[str, Any]) -> list[dict[str, Any]]:
    """The claims of issue 3, each with its measured values (means over the sampling settings)."""
    tuned, base = numbers["tuned"]["all settings"], numbers["base"]["all settings"]
    found = [
        {"claim": "subject fidelity (CLIP-I) beats the base model",
         "measured": f"{tuned['clip_i']:.3f} vs {base['clip_i']:.3f}", "passed": tuned["clip_i"] > base["clip_i"]},
        {"claim": "miru's markings are detected more often than in the base model's white cats",
         "measured": f"{tuned['marking_rate']:.3f} vs {base['marking_rate']:.3f}",
         "passed": tuned["marking_rate"] > base["marking_rate"]},
        {"claim": f"scene accuracy stays at least {MIN_SCENE_ACCURACY:.0%}",
         "measured": f"{tuned['scene_accuracy']:.3f}", "passed": tuned["scene_accuracy"] >= MIN_SCENE_ACCURACY},
    ]
    if "no_prior" in numbers:
        no_prior = numbers["no_prior"]["all settings"]
        found.append({"claim": "PRES is lower with prior preservation than without",
                      "measured": f"{tuned['pres']:.3f} vs {no_prior['pres']:.3f}",
                      "passed": tuned["pres"] < no_prior["pres"]})
    return found


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def write_demo_report(output: Path, numbers: dict[str, Any], run) -> Path:
    """report.md: the grids, the loss curve, the numbers of every model and the checks they pass."""
    metrics = read_jsonl(run.metrics)
    lines = [
        "# DreamBooth in the miniature world",
        "",
        f"Miru (a white cat with orange ears, a blue collar and a black tail, never seen by the base model) was "
        f"learned from {len(list((output / 'instance').glob('*.png')))} photos in {len(metrics)} steps "
        f"({metrics[-1]['seconds']:.0f} s of training; final loss {metrics[-1]['loss']:.3f}). The photos were "
        f"captioned \"{INSTANCE_CAPTION}\" and masked, so the room is not learned as part of miru; the embeddings "
        f"of \"{IDENTIFIER}\" learned at their own rate, the rest of the text encoder at a tenth of the UNet's.",
        "",
        "## Miru in new scenes (fine-tuned with prior preservation)",
        "",
        "![grid](samples/grid.png)",
        "",
    ]
    if "no_prior" in numbers:
        lines += ["## The same fine-tuning without prior preservation", "", "![no prior](samples-no-prior/grid.png)", ""]
    lines += [
        "## The base model asked for a white cat (no DreamBooth)",
        "",
        "![baseline](baseline/grid.png)",
        "",
        "## Checks",
        "",
        *[f"- {'yes' if c['passed'] else '**no**'}: {c['claim']} ({c['measured']})" for c in numbers["checks"]],
        "",
        "## Numbers (world-CLIP)",
        "",
        "Subject fidelity is CLIP-I against the instance photos; prompt fidelity is CLIP-T and the zero-shot scene "
        "accuracy; the marking rate is the share of \"miru cat <scene>\" images that the world-CLIP reads as white and "
        "as a white cat with orange ears, a blue collar and a black tail rather than a plain one; PRES compares "
        "\"a photo of a cat\" images with miru's photos (lower: the class is kept); DIV is 1 - similarity between "
        "seeds of one prompt.",
        "",
        "| model | setting | CLIP-I | CLIP-T | scene acc. | marking rate | PRES | DIV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, label in MODELS.items():
        for setting, values in numbers.get(model, {}).items():
            cells = [f"{values[k]:.3f}" if values[k] is not None else "-" for k in METRICS]
            lines.append(f"| {label} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "## Training loss", "", "![loss](run/loss.png)", "",
              "Reproduce: `dreambooth demo --output " + str(output) + " --overwrite`"]
    atomic_write_text(output / "report.md", "\n".join(lines) + "\n")
    return output / "report.md"
