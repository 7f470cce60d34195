"""The run folder's fixed names, and resumable checkpoints that survive `kill -9`.

A checkpoint is accelerate's state (model weights as safetensors, optimizer, schedule, RNG) written into
a temporary folder and renamed to `checkpoints/step-NNNNNN` only when complete, with `state.json` last.
accelerate reads optimizer and RNG files with `torch.load(weights_only=True)`, so resuming runs no pickle code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth import lora
from dreambooth.errors import UserError
from dreambooth.files import (LOCK_FILE, atomic_write_text, move_aside, read_jsonl, removed_on_failure, replace_dir,
                              write_jsonl)

STEP_FOLDER = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"
# Settings that may change between a run and its resumption without making it a different run (they do not
# change what the steps compute).
RESUMABLE_CHANGES = {
    "resume", "overwrite", "max_train_steps", "save_pipeline_at", "checkpoint_every", "checkpoint_minutes",
    "keep_checkpoints",
    "validation_prompt", "validation_every", "validation_seeds", "validation_sampling_steps",
    "output",  # a run folder moved or copied elsewhere resumes there
    "log_every", "save_dtype", "latent_cache_dir", "estimate_memory",
    "on_nan",  # a run stopped by a NaN resumes with --on-nan skip
    "report_to", "logging_dir", "tracker_project", "license",  # where the run is logged and how it is published
}
# Settings that name files: compared by what they point at, not by spelling ("inst", "./inst/", its absolute path).
PATH_SETTINGS = {"model", "instance_dir", "instance_mask_dir", "class_dir", "vae", "model_config"}


@dataclass(frozen=True)
class RunPaths:
    """Every file a training run writes, by its fixed name (later tools read these names)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    def pipeline_at(self, step: int) -> Path:
        """The trained weights saved at an intermediate step (`save_pipeline_at`): a pipeline, or a LoRA folder."""
        return self.root / "pipelines" / f"step-{step:06d}"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def final_model(self) -> Path:
        """The trained weights at the end of the run: the LoRA folder of a LoRA run, else the pipeline."""
        return self.lora if lora.is_lora_folder(self.lora) else self.pipeline

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def model_card(self) -> Path:
        return self.root / "README.md"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def validation_step(self, step: int) -> Path:
        return self.validation / f"step-{step:06d}"


def is_trained_model(folder: Path) -> bool:
    """A complete pipeline or LoRA folder (both are written atomically, so a present one is whole)."""
    return (folder / "model_index.json").is_file() or lora.is_lora_folder(folder)


def claim_run_folder(paths: RunPaths, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse to write over another run or someone's files; with --overwrite move everything the folder holds
    aside; with --resume check it is this run."""
    import yaml

    root = paths.root
    if root.exists() and not root.is_dir():
        raise UserError(f"--output {root}: exists and is not a folder")
    if overwrite:
        # Everything the folder holds, ours or not: a file we did not write is never opened for writing.
        held = [p.name for p in root.iterdir()
                if not p.name.startswith("replaced-") and p.name != LOCK_FILE] if root.is_dir() else []
        moved = move_aside(root, held)
        if moved:
            print(f"--overwrite: moved what {root} held to {moved}")
        return
    if not paths.config.is_file():
        leftovers = [p.name for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
        if leftovers:
            raise UserError(
                f"--output {root}: holds files that are not a dreambooth run ({', '.join(sorted(leftovers)[:3])}); "
                "pick an empty or new folder, or pass --overwrite to move them aside"
            )
        return
    if not resume:
        raise UserError(f"--output {root}: already holds a run; "
                        "pass --resume to continue it or --overwrite to start afresh")
    stored = yaml.safe_load(paths.config.read_text()) or {}
    changed = sorted(
        key for key, value in settings.items()
        if key not in RESUMABLE_CHANGES and key in stored and not same_setting(key, stored[key], value)
    )
    if changed:
        details = ", ".join(f"{key}: {stored[key]!r} -> {settings[key]!r}" for key in changed[:4])
        raise UserError(f"--resume: {root} was trained with other settings ({details}); use a new --output")


def same_setting(key: str, stored: Any, given: Any) -> bool:
    """Whether a resumed run's setting is the recorded one; a path (an existing file or folder) by what it names,
    anything else (a hub id, a number) as it is written."""
    if key in PATH_SETTINGS and isinstance(stored, str) and isinstance(given, str):
        return canonical_path(stored) == canonical_path(given)
    return stored == given


def canonical_path(value: str) -> str:
    return os.path.realpath(value) if os.path.exists(value) else value


def save_checkpoint(accelerator, paths: RunPaths, step: int, keep: int) -> Path:
    """Write a complete checkpoint for `step` atomically, then prune all but the newest `keep`."""
    final = paths.checkpoint(step)
    # Every process writes into one shared temporary folder (each saves its own RNG state there).
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # A full disk (or a second Ctrl-C) mid-write: the partial folder goes, and the older checkpoints stay as they were.
    with removed_on_failure(tmp):
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step}))
            replace_dir(tmp, final)
    if accelerator.is_main_process:
        for _, old in list_checkpoints(paths)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(paths: RunPaths) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (half-written ones never carry the final name)."""
    if not paths.checkpoints.is_dir():
        return []
    found = []
    for folder in paths.checkpoints.iterdir():
        match = STEP_FOLDER.match(folder.name)
        if match and (folder / STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def load_latest_checkpoint(accelerator, paths: RunPaths, partial_models: list | None = None) -> int:
    """Restore the newest checkpoint that loads into the prepared objects; return its step (0 when there is
    none). A damaged one (a truncated or garbled file) is skipped with a warning for the one before it, which
    then overwrites whatever the damaged one had loaded.

    `partial_models` (LoRA runs, see `save_only_trainable_weights`): the prepared models, whose checkpoint
    files hold only their trainable weights; every one of those must be there.
    """
    checkpoints = list_checkpoints(paths)
    for step, folder in reversed(checkpoints):
        try:
            load_checkpoint(accelerator, folder, partial_models)
            return step
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a damaged file makes torch or safetensors raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            # Renamed, not deleted: out of the list of checkpoints (and of --keep-checkpoints' count), still there.
            kept = folder.with_name(f"{folder.name}.damaged")
            while kept.exists():
                kept = kept.with_name(f"{kept.name}-1")
            if accelerator.is_main_process:
                os.replace(folder, kept)
            print(f"--resume: {folder} is damaged ({reason}); moved it to {kept.name} and trying the checkpoint "
                  "before it", file=sys.stderr)
    if checkpoints:
        raise UserError(f"--resume: none of the {len(checkpoints)} checkpoints in {paths.checkpoints} loads; "
                        "start afresh with --overwrite")
    return 0


def load_checkpoint(accelerator, folder: Path, partial_models: list | None) -> None:
    if partial_models is None:
        accelerator.load_state(str(folder))
        return
    from safetensors import safe_open

    for index, model in enumerate(partial_models):
        file = folder / f"model{f'_{index}' if index else ''}.safetensors"
        with safe_open(str(file), framework="pt") as handle:
            missing = trainable_names(model) - set(handle.keys())
        if missing:
            raise UserError(f"--resume: {file} lacks trained weights ({sorted(missing)[0]}, ...); "
                            "it was written by another kind of run: use a new --output")
    accelerator.load_state(str(folder), strict=False)


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_only_trainable_weights(accelerator) -> None:
    """Make checkpoints hold only the weights that learn (LoRA adapters, trained embeddings), not the frozen
    base model (gigabytes for SD): resuming loads the base model as usual and these over it."""

    def drop_frozen(models: list, weights: list[dict], output_dir: str) -> None:
        for model, state in zip(models, weights):
            learning = trainable_names(model)
            for key in [key for key in state if key not in learning]:
                del state[key]

    accelerator.register_save_state_pre_hook(drop_frozen)


def truncate_metrics(paths: RunPaths, step: int) -> tuple[float, int]:
    """Drop metric lines past `step` (they will be trained again); return the seconds already spent and the
    updates --on-nan skip left out up to `step`."""
    kept = [record for record in read_jsonl(paths.metrics) if record.get("step", 0) <= step]
    write_jsonl(paths.metrics, kept)
    last = kept[-1] if kept else {}
    return float(last.get("seconds", 0.0)), int(last.get("skipped_steps", 0))
