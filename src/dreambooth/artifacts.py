"""What a finished run shows a person: the loss curve (RUN/loss.png) and the model card (RUN/README.md).

The card is a Hugging Face model card: a YAML metadata block (license, base_model, tags, instance_prompt, a widget
of the run's own validation images) that `huggingface_hub.ModelCard.load` reads and the Hub renders, then the text.
Every path in it is relative, so it reads the same in the run folder and in a hub repository, where `dreambooth
push` puts the trained model at the root and the card's files at the same relative paths (dreambooth.hub).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dreambooth.aliases import model_alias_folder
from dreambooth.errors import UserError
from dreambooth.files import atomic_file, atomic_write_text, read_jsonl
from dreambooth.options import RUN_RECORD

SAMPLE_NAME = re.compile(r"^p(\d+)-seed")  # validation/step-NNNNNN/p<prompt index>-seed<seed>.png (train.py)
HUB_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")  # a hub model's folder in the hub cache
FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl"}


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


def run_record(paths) -> dict[str, Any]:
    """What RUN/config.yaml says the run was made from (family, base model and where it was)."""
    import yaml

    if not paths.config.is_file():
        return {}
    return (yaml.safe_load(paths.config.read_text()) or {}).get(RUN_RECORD, {})


def base_model_name(run: dict[str, Any], settings: dict[str, Any]) -> str:
    """The base model as the card names it: a hub id or alias as given, a local folder or file by its name alone
    (the run folder's name for a RUN/pipeline; the hub id for a folder in the hub cache), never a local path."""
    requested = str(run.get("base_model", settings["model"]))
    location = str(run.get("base_model_location", requested))
    if run.get("base_model_kind") == "hub" or model_alias_folder_or_none(requested) is not None:
        return requested
    path = Path(location).expanduser()
    if run.get("base_model_kind") is None and not path.exists():  # an older run without a record: as typed
        return requested if not requested.startswith(("/", ".", "~")) else path.name
    if match := HUB_CACHE_SNAPSHOT.search(path.resolve().as_posix()):
        return f"{match[1]}/{match[2]}"
    return path.parent.name if path.name == "pipeline" else path.name


def model_alias_folder_or_none(name: str) -> Path | None:
    """The folder an alias names; None for no alias, or one whose weights are missing (the card still names it)."""
    try:
        return model_alias_folder(name)
    except UserError:
        return None


def base_model_license(run: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """The license in the base model's own card where that card is on this machine: a hub model's cached README.md
    (no download here: the card is written at the end of training, offline or not), a folder's README.md, or a
    RUN folder's card for its pipeline."""
    from huggingface_hub import metadata_load, try_to_load_from_cache

    requested = str(run.get("base_model", settings["model"]))
    candidates: list[Path] = []
    if run.get("base_model_kind") == "hub":
        cached = try_to_load_from_cache(requested, "README.md", revision=settings.get("revision"))
        candidates = [Path(cached)] if isinstance(cached, str) else []
    elif run.get("base_model_kind") == "folder":
        folder = model_alias_folder_or_none(requested) or Path(str(run.get("base_model_location")))
        candidates = [folder / "README.md"] + ([folder.parent / "README.md"] if folder.name == "pipeline" else [])
    for card in candidates:
        try:
            license_id = (metadata_load(card) or {}).get("license") if card.is_file() else None
        except Exception:  # a card whose metadata does not parse tells us nothing
            license_id = None
        if license_id:
            return str(license_id)
    return None


def sample_prompt(image: Path, settings: dict[str, Any]) -> str | None:
    """A validation image's prompt, from its PNG record, else from the validation prompts by the index in its name
    (an image from before the record, or without one)."""
    from dreambooth.png_metadata import read_png_record

    try:
        prompt = read_png_record(image).get("prompt")
    except (ValueError, AttributeError):  # a garbled record: the name still tells
        prompt = None
    if prompt:
        return str(prompt)
    prompts = settings.get("validation_prompt") or []
    index = int(match[1]) if (match := SAMPLE_NAME.match(image.name)) else len(prompts)
    return prompts[index] if index < len(prompts) else None


def card_samples(paths, settings: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The newest validation step's images (what the trained model draws) as (path relative to the run, prompt)."""
    steps = sorted(folder for folder in paths.validation.glob("step-*") if folder.is_dir())
    if not steps:
        return []
    return [(image.relative_to(paths.root).as_posix(), sample_prompt(image, settings))
            for image in sorted(steps[-1].glob("*.png"))]


def card_metadata(paths, settings: dict[str, Any], run: dict[str, Any], samples: list[tuple[str, str | None]]):
    """The card's metadata block as huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    is_lora = paths.final_model == paths.lora
    family = run.get("family", "sd")
    base = base_model_name(run, settings)
    from_hub = run.get("base_model_kind") == "hub"
    widget = [{"text": prompt or settings["instance_prompt"], "output": {"url": url}} for url, prompt in samples]
    return ModelCardData(
        license=settings.get("license") or base_model_license(run, settings),
        base_model=base,
        # The Hub's model tree reads this: an adapter over the base, or a fine-tune of it (only for a hub id).
        base_model_relation=("adapter" if is_lora else "finetune") if from_hub else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["dreambooth", "text-to-image", "diffusers", FAMILY_TAGS.get(family, "stable-diffusion")]
        + (["lora"] if is_lora else []),
        instance_prompt=settings["instance_prompt"],
        widget=widget or None,
    )


def write_model_card(paths, settings: dict[str, Any], repo_id: str | None = None) -> Path:
    """Write RUN/README.md (model_card_text) and return its path."""
    atomic_write_text(paths.model_card, model_card_text(paths, settings, repo_id))
    return paths.model_card


def model_card_text(paths, settings: dict[str, Any], repo_id: str | None = None) -> str:
    """The run's model card: metadata, what it was trained from and how, how it went, and how to use it, from the
    run folder (`repo_id` None) or from the hub repository `repo_id` it is pushed to."""
    records = trained_steps(paths.metrics)
    final = records[-1] if records else {}
    lowest = min(records, key=lambda r: r["loss"]) if records else {}
    run = run_record(paths)
    samples = card_samples(paths, settings)
    metadata = card_metadata(paths, settings, run, samples)
    pipeline_class = "StableDiffusionXLPipeline" if run.get("family") == "sdxl" else "StableDiffusionPipeline"
    is_lora = paths.final_model == paths.lora
    base = metadata.base_model
    from_hub = run.get("base_model_kind") == "hub"
    pinned = "".join(f', {key}="{settings[key]}"' for key in ("revision", "variant") if settings.get(key))
    prompt = settings["instance_prompt"]
    if is_lora:
        # A local base has no address a reader could use: a placeholder says to put their copy's path there.
        base_location = base if from_hub or model_alias_folder_or_none(base) else f"path/to/{base}"
        loading = [f'pipeline = {pipeline_class}.from_pretrained("{base_location}"{pinned})',
                   f'pipeline.load_lora_weights("{repo_id or "lora"}")']
    else:
        loading = [f'pipeline = {pipeline_class}.from_pretrained("{repo_id or "pipeline"}")']
    where = "" if repo_id else "  # from this run folder"
    base_text = f"[{base}](https://huggingface.co/{base})" if from_hub else f"`{base}`"
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# DreamBooth: {prompt}",
        "",
        f"{'LoRA adapters (rank ' + str(settings.get('lora_rank')) + ') for' if is_lora else 'Fine-tuned from'} "
        f"{base_text}, trained with [dreambooth](https://pypi.org/project/dreambooth/). "
        f"Its subject is called up by the prompt `{prompt}`.",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipeline_class}",
        "",
        loading[0] + where, *loading[1:],
        f'image = pipeline("{prompt} by the sea").images[0]',
        "```",
        "",
    ]
    if repo_id is None:
        lines.append(f'or, from this run folder, `dreambooth generate --model . --prompt "{prompt} by the sea" '
                     '--output samples`.')
    elif not is_lora:
        lines.append(f'or `dreambooth generate --model {repo_id} --prompt "{prompt} by the sea" --output samples`.')
    elif from_hub:  # the LoRA's base_model.json names the base by its hub id, which any machine can load
        lines.append(f"or `hf download {repo_id} --local-dir {repo_id.split('/')[-1]}`, then `dreambooth generate "
                     f"--model {repo_id.split('/')[-1]} --prompt \"{prompt} by the sea\" --output samples`.")
    if is_lora and (paths.lora / "embeddings.safetensors").is_file():
        lines += ["", "The identifier's trained token embeddings (`embeddings.safetensors`) are applied by "
                      "`dreambooth generate`; plain diffusers loads the adapters alone."]
    lines += ["", "## Training", "", "| setting | value |", "| --- | --- |", f"| base model | {base} |"]
    for key in ("revision", "variant", "instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight",
                "resolution", "learning_rate", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                "lr_scheduler", "train_text_encoder", "mixed_precision", "seed", "lora_rank", "lora_alpha"):
        if (key.startswith("lora") and not is_lora) or (key in ("revision", "variant") and not settings.get(key)):
            continue
        lines.append(f"| {key} | {settings.get(key)} |")
    if final:
        skips = (read_jsonl(paths.metrics) or [{}])[-1].get("skipped_steps")
        lines += ["", f"Final loss {final['loss']:.4f} at step {final['step']}; "
                      f"lowest {lowest['loss']:.4f} at step {lowest['step']}; "
                      f"{final.get('seconds', 0):.0f} s of training."
                      + (f" {skips} updates with a non-finite loss or gradient were skipped (--on-nan skip)."
                         if skips else "")]
    if paths.loss_plot.is_file():
        lines += ["", "![loss](loss.png)"]
    if samples:
        lines += ["", f"## Validation images ({Path(samples[0][0]).parent.name})", ""]
        # The prompt as the image's alt text, without brackets that would end the Markdown early.
        lines += [f"![{re.sub(r'[][]', '', prompt or Path(url).stem)}]({url})" for url, prompt in samples]
    return "\n".join(lines) + "\n"
