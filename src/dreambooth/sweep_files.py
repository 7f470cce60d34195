"""What a sweep file and a sweep folder mean, read one way by the sweep that writes them and the report that reads them.

A leaf module (no torch, no diffusers): the report imports it without importing the sweep, which sits upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dreambooth.errors import UserError
from dreambooth.files import read_jsonl

# The sweep folder's own files (each run's files are named by checkpoints.RunPaths, each trial's samples by sampling).
SWEEP_COPY = "sweep.yaml"  # the sweep file as it was run
TRIALS = "trials.jsonl"  # one line per trial: its run, step, grid values and status
METRIC_ROWS = "metrics.jsonl"  # `evaluate`'s rows of every trial, each with its "trial"
# Every name a sweep writes at the top of its folder, the report's included.
SWEEP_NAMES = [SWEEP_COPY, TRIALS, METRIC_ROWS, "report.html", "report.md", "report_files", "runs", "samples",
               "class_images", "latent_cache", "logs"]


def fill_prompt(template: str, identifier: str, class_name: str) -> str:
    """A sweep prompt with `{id}` replaced by the identifier (the subject's word) and `{class}` by the class noun."""
    return template.replace("{id}", identifier).replace("{class}", class_name)


def plain_class_prompt(class_prompt: str | None, class_name: str | None) -> str | None:
    """The prompt whose images measure PRES: the training class prompt, else "a photo of a <class>" (None: neither)."""
    if class_prompt:
        return class_prompt
    return f"a photo of a {class_name}" if class_name else None


def read_trial_records(directory: Path) -> dict[str, dict[str, Any]]:
    """trial name -> its newest line in DIR/trials.jsonl (a later line for a trial is its newer status)."""
    return {str(record["trial"]): record for record in read_jsonl(Path(directory) / TRIALS) if record.get("trial")}


def check_sweep_folder(directory: Path, sweep_file: Path) -> None:
    """Refuse an --output holding something a sweep would write over that no sweep wrote. A sweep folder holds the
    copy of its sweep file and trials.jsonl (or only the copy, if the first sweep was killed at once)."""
    copy = directory / SWEEP_COPY
    if copy.is_file() and (directory / TRIALS).is_file():
        return
    for name in SWEEP_NAMES:
        path = directory / name
        if path == copy and path.is_file() and path.read_bytes() == Path(sweep_file).read_bytes():
            continue  # the sweep file itself, kept in the folder it runs in
        if path.exists() or path.is_symlink():
            raise UserError(f"--output {directory} holds {name}, which no sweep wrote; pick a new or empty folder")
