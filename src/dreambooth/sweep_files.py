"""What a sweep file and a sweep folder mean, read one way by the sweep that writes them and the report that reads them.

A leaf module (no torch, no diffusers): the report imports it without importing the sweep, which sits upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dreambooth.files import read_jsonl

# The sweep folder's own files (each run's files are named by checkpoints.RunPaths, each trial's samples by sampling).
SWEEP_COPY = "sweep.yaml"  # the sweep file as it was run
TRIALS = "trials.jsonl"  # one line per trial: its run, step, grid values and status
METRIC_ROWS = "metrics.jsonl"  # `evaluate`'s rows of every trial, each with its "trial"


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
