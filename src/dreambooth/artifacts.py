"""What a finished run shows a person: the loss curve (RUN/loss.png) and the model card (RUN/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dreambooth.files import atomic_file, atomic_write_text, read_jsonl
from dreambooth.options import RUN_RECORD


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to zero."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def write_loss_plot(metrics_path: Path, output: Path) -> Path | None:
    """Plot loss (raw and smoothed) and, with prior preservation, its two terms; None when there is nothing."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, renders with Agg

    records = trained_steps(metrics_path)
    if not records:
        return None
    steps = [record["step"] for record in records]
    figure = Figure(figsize=(7, 4), dpi=100, layout="tight")
    axis = figure.add_subplot()
    axis.plot(steps, [r["loss"] for r in records], color="tab:blue", alpha=0.25, linewidth=1)
    axis.plot(steps, smooth([r["loss"] for r in records]), color="tab:blue", label="loss (smoothed)")
    if any("prior_loss" in r for r in records):
        for key, color in (("instance_loss", "tab:orange"), ("prior_loss", "tab:green")):
            values = [r.get(key, float("nan")) for r in records]
            axis.plot(steps, smooth(values), color=color, label=f"{key} (smoothed)")
    axis.set_xlabel("step")
    axis.set_ylabel("MSE")
    axis.grid(alpha=0.3)
    axis.legend()
    with atomic_file(output) as tmp:
        figure.savefig(tmp)
    return output


def trained_steps(metrics_path: Path) -> list[dict[str, Any]]:
    """The metric lines of steps that had a loss (--on-nan skip writes a skipped step's loss as null)."""
    return [record for record in read_jsonl(metrics_path) if record.get("loss") is not None]


def _run_record(paths) -> dict[str, Any]:
    """What RUN/config.yaml says the run was made from (family, base model)."""
    import yaml

    if not paths.config.is_file():
        return {}
    return (yaml.safe_load(paths.config.read_text()) or {}).get(RUN_RECORD, {})


def write_model_card(paths, settings: dict[str, Any]) -> Path:
    """A README for the run: what it was trained from and how, how it went, and how to use it."""
    records = trained_steps(paths.metrics)
    final = records[-1] if records else {}
    lowest = min(records, key=lambda r: r["loss"]) if records else {}
    run = _run_record(paths)
    pipeline_class = "StableDiffusionXLPipeline" if run.get("family") == "sdxl" else "StableDiffusionPipeline"
    is_lora = paths.final_model == paths.lora
    if is_lora:
        base = run.get("base_model_location", settings["model"])
        loading = [f'pipeline = {pipeline_class}.from_pretrained("{base}")',
                   f'pipeline.load_lora_weights("{paths.lora.resolve()}")']
    else:
        loading = [f'pipeline = {pipeline_class}.from_pretrained("{paths.pipeline.resolve()}")']
    lines = [
        f"# DreamBooth: {settings['instance_prompt']}",
        "",
        f"{'LoRA adapters (rank ' + str(settings.get('lora_rank')) + ') for' if is_lora else 'Fine-tuned from'} "
        f"`{settings['model']}`, trained with [dreambooth](https://pypi.org/project/dreambooth/).",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipeline_class}",
        *loading,
        f'image = pipeline("{settings["instance_prompt"]} by the sea").images[0]',
        "```",
        "",
        f"or `dreambooth generate --model {paths.root} --prompt \"{settings['instance_prompt']} by the sea\" "
        "--output samples`.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key in ("instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight", "resolution",
                "learning_rate", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                "lr_scheduler", "train_text_encoder", "mixed_precision", "seed", "lora_rank", "lora_alpha"):
        if key.startswith("lora") and not is_lora:
            continue
        lines.append(f"| {key} | {settings.get(key)} |")
    if final:
        lines += ["", f"Final loss {final['loss']:.4f} at step {final['step']}; "
                      f"lowest {lowest['loss']:.4f} at step {lowest['step']}; "
                      f"{final.get('seconds', 0):.0f} s of training."
                      + (f" {skips} updates with a non-finite loss or gradient were skipped (--on-nan skip)."
                         if (skips := (read_jsonl(paths.metrics) or [{}])[-1].get("skipped_steps")) else ""),
                  "", "![loss](loss.png)"]
    samples = sorted(paths.validation.glob("step-*/*.png"))
    if samples:
        last_step = samples[-1].parent
        lines += ["", f"## Validation images ({last_step.name})", ""]
        images = sorted(last_step.glob("*.png"))
        lines += [f"![{image.stem}](validation/{last_step.name}/{image.name})" for image in images]
    atomic_write_text(paths.model_card, "\n".join(lines) + "\n")
    return paths.model_card
