"""Experiment tracking through accelerate's trackers (TensorBoard, wandb): what a run and a sweep log, in one place.

RUN/metrics.jsonl stays the record (`metrics_record` makes its lines). Every number logged here is one written
there, handed over at the same flush with each step's own step number, so tracking never makes the GPU wait. Only
the main process logs (accelerate starts trackers there alone). A resumed run continues its tracker run: TensorBoard
writes into the same folder and hides the events past the resumed step (they are trained again); wandb resumes the
run whose id RUN/logs keeps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreambooth.config import TrainConfig
from dreambooth.errors import UserError

if TYPE_CHECKING:
    from dreambooth.train import StepResult

TRACKERS = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": 'pip install "dreambooth[wandb]"'}
WANDB_ID_FILE = "wandb-run-id"  # in the logging folder: a resumed run continues the wandb run it names
TRIAL_MARKER = "logged.json"  # in a trial's logging folder: what was logged, so a resumed sweep logs it once
# metrics.jsonl key -> the tracker's name for it (steps per second is worked out from `seconds`).
STEP_SCALARS = {"loss": "train/loss", "instance_loss": "train/instance_loss", "prior_loss": "train/prior_loss",
                "lr": "train/lr", "text_encoder_lr": "train/text_encoder_lr", "grad_norm": "train/grad_norm"}
STEPS_PER_SECOND = "train/steps_per_second"
TRIAL_METRICS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}


def tracker_names(report_to: str) -> tuple[str, ...]:
    return TRACKERS[report_to]


def logging_dir(config: TrainConfig) -> Path:
    """Where a run's trackers write: --logging-dir, else RUN/logs."""
    return Path(config.logging_dir) if config.logging_dir else Path(config.output) / "logs"


def check_trackers(report_to: str) -> None:
    """Refuse a tracker whose package is missing, before anything is loaded (accelerate would drop it silently)."""
    for name in tracker_names(report_to):
        if importlib.util.find_spec(name) is None:
            others = ", ".join(choice for choice in TRACKERS if choice != report_to)
            raise UserError(f"--report-to {report_to}: {name} is not installed; {INSTALL[name]}, "
                            f"or choose another --report-to ({others})")


def accelerator_options(config: TrainConfig) -> dict[str, Any]:
    """The Accelerator's tracking arguments for a run (trackers are started later by `start_run_tracking`)."""
    from accelerate.utils import ProjectConfiguration

    folders = ProjectConfiguration(logging_dir=str(logging_dir(config)))
    return {"log_with": list(tracker_names(config.report_to)) or None, "project_config": folders}


def wandb_run_id(folder: Path, resume: bool) -> str:
    """The wandb run of this logging folder: the kept one when resuming, else a new one (kept for a later resume)."""
    path = folder / WANDB_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    from dreambooth.files import atomic_write_text

    run_id = uuid.uuid4().hex[:16]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


def metrics_record(step: int, result: StepResult, seconds: float, skips: int = 0) -> dict[str, Any]:
    """One metrics.jsonl line; a non-finite number is written as null, so the line is valid JSON."""
    def number(value) -> float | None:
        return None if value is None or not math.isfinite(value := float(value)) else value

    record: dict[str, Any] = {"step": step, "loss": number(result.loss), "instance_loss": number(result.instance_loss)}
    if result.prior_loss is not None:
        record["prior_loss"] = number(result.prior_loss)
    record["lr"] = result.lr
    if result.text_encoder_lr is not None:
        record["text_encoder_lr"] = result.text_encoder_lr
    record.update(grad_norm=number(result.grad_norm), seconds=round(seconds, 3))
    if result.skipped:
        record["skipped"] = True
    if skips:
        record["skipped_steps"] = skips  # how many updates --on-nan skip has left out so far in the run
    return record


def scalar_config(settings: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Settings as the flat scalars TensorBoard's hparams take: nested keys joined by dots, lists as JSON text,
    None left out."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalar_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


def write_tensorboard_config(writer, settings: dict[str, Any], metrics: list[str], step: int = 0) -> None:
    """The settings into the run's own folder (accelerate's store_init_configuration would add a folder per start):
    as hparams, so the HParams tab compares runs by them and by `metrics`, and as YAML in the Text tab."""
    import yaml
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(scalar_config(settings), {name: 0.0 for name in metrics}):
        writer.file_writer.add_summary(summary, step)
    writer.add_text("config", "```\n" + yaml.safe_dump(settings, sort_keys=False) + "```", step)


def start_run_tracking(accelerator, config: TrainConfig, settings: dict[str, Any], start_step: int,
                       seconds_before: float, group: str | None = None, then: str = "") -> RunTracking:
    """Start the run's trackers with `settings` as its config, continuing the tracker run of a resumed run.
    A tracker that cannot start (wandb not logged in) ends in one line; `then` says how to continue."""
    folder = logging_dir(config)
    options: dict[str, dict[str, Any]] = {"tensorboard": {"purge_step": start_step + 1}}
    if "wandb" in tracker_names(config.report_to) and accelerator.is_main_process:
        # wandb's config keeps nested values; a key starting with "_" would be hidden as wandb's own.
        options["wandb"] = {"name": Path(config.output).resolve().name, "group": group, "job_type": "train",
                            "id": wandb_run_id(folder, config.resume), "resume": "allow", "dir": str(folder),
                            "config": {key.lstrip("_"): value for key, value in settings.items()}}
    started(lambda: accelerator.init_trackers(config.tracker_project, init_kwargs=options), config.report_to, then)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            write_tensorboard_config(tracker.writer, settings, [STEP_SCALARS["loss"]])
    return RunTracking(accelerator.trackers, seconds_before)


def started(start: Callable[[], Any], report_to: str, then: str = "") -> None:
    """Call `start`; a tracker that cannot start (wandb offline without WANDB_MODE=offline, or not logged in) ends
    in one line."""
    try:
        start()
    except Exception as error:  # noqa: BLE001 - whatever a tracker's own start raises
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--report-to {report_to}: a tracker could not start ({reason}); for wandb run `wandb login` "
                        f"or set WANDB_MODE=offline{then}") from error


class RunTracking:
    """A run's started trackers, and the training seconds of the last step logged (steps per second follow)."""

    def __init__(self, trackers: list, seconds_before: float):
        self.trackers = list(trackers)
        self.seconds = seconds_before
        # Online, a resumed wandb run already holds the steps up to where it stopped; it would refuse them again.
        self.wandb_from = next((t.tracker.step for t in self.trackers if t.name == "wandb"), 0)

    def log_steps(self, records: list[dict[str, Any]]) -> None:
        """Log metrics.jsonl records, each at its own step."""
        for record in records:
            values = {name: record[key] for key, name in STEP_SCALARS.items() if record.get(key) is not None}
            step, seconds = record["step"], record["seconds"]
            if seconds > self.seconds:  # every step has a line: the time since the last one is this step's
                values[STEPS_PER_SECOND] = 1 / (seconds - self.seconds)
            self.seconds = seconds
            for tracker in self.trackers:
                if tracker.name != "wandb" or step >= self.wandb_from:
                    tracker.log(values, step=step)

    def log_validation(self, step: int, images: list[tuple[str, str, Any]]) -> None:
        """The validation images (name, prompt, PIL image) of `step`, each with its prompt."""
        if not images:
            return
        import numpy as np

        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                for name, _, image in images:
                    tracker.writer.add_image(f"validation/{name}", np.asarray(image), step, dataformats="HWC")
                prompts = dict((name.split("-")[0], prompt) for name, prompt, _ in images)  # p<index>-seed<seed>
                tracker.writer.add_text("validation/prompts", "\n\n".join(f"{k}: {v}" for k, v in prompts.items()),
                                        step)
                tracker.writer.flush()
            elif tracker.name == "wandb" and step >= self.wandb_from:
                import wandb

                tracker.tracker.log({"validation": [wandb.Image(image, caption=f"{name}: {prompt}")
                                                    for name, prompt, image in images]}, step=step)

    def finish(self, failed: bool) -> None:
        """End the trackers' runs (a failed one shows as failed in wandb; --resume continues it)."""
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.tracker.finish(exit_code=1 if failed else 0)
            else:
                tracker.finish()
        self.trackers = []


def trial_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A sweep trial's metrics as summary values: each pooled over all its images (as the report pools them), and
    per sampling setting when the trial has several."""
    from dreambooth.report import setting_label, summarize

    summary: dict[str, float] = {}
    every = summarize([{**row, "steps": 0, "guidance": 0.0, "scheduler": ""} for row in rows])
    settings = summarize(rows)
    for entry, suffix in [(e, "") for e in every] + ([(e, "/" + setting_label(e["setting"])) for e in settings]
                                                     if len(settings) > 1 else []):
        for key, name in TRIAL_METRICS.items():
            if math.isfinite(entry[key]):
                summary[name + suffix] = entry[key]
    return summary


def sweep_logging_dir(logging_dir: str | None, sweep_folder: Path) -> Path:
    """A sweep's trackers' folder (`logging_dir:` in the sweep file, else SWEEP/logs): each run logs into runs/<run>/
    and each trial into <trial>/, so one `tensorboard --logdir` shows them all and no two share a folder."""
    return Path(logging_dir) if logging_dir else Path(sweep_folder) / "logs"


def log_trial(config: TrainConfig, sweep_folder: Path, logs: Path, name: str, settings: dict[str, Any],
              step: int) -> None:
    """Log a sweep trial as a tracker run of its own in logs/<name>/, grouped by the sweep (wandb's group is the
    sweep folder's name): its grid settings as config, its metrics (rows of the sweep's metrics.jsonl) as summary
    values. `config` is its run's TrainConfig, which says where to report. Once, unless what it logs changed."""
    names = tracker_names(config.report_to)
    if not names:
        return
    check_trackers(config.report_to)
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    from dreambooth.files import atomic_write_text, read_jsonl
    from dreambooth.sweep_files import METRIC_ROWS

    rows = [row for row in read_jsonl(sweep_folder / METRIC_ROWS) if row.get("trial") == name]
    summary, config_values, folder = trial_summary(rows), {**settings, "step": step}, logs / name
    logged = json.dumps({"trackers": names, "config": config_values, "summary": summary}, sort_keys=True, default=str)
    marker = folder / TRIAL_MARKER
    if marker.is_file() and marker.read_text() == logged:
        return
    if "tensorboard" in names:
        tracker = TensorBoardTracker(".", folder, purge_step=step)  # a trial logged again hides its old events
        started(tracker.start, config.report_to)
        write_tensorboard_config(tracker.writer, config_values, [f"trial/{metric}" for metric in summary], step)
        for metric, value in summary.items():
            tracker.writer.add_scalar(f"trial/{metric}", value, step)
        tracker.finish()
    if "wandb" in names:
        tracker = WandBTracker(config.tracker_project, name=name, group=sweep_folder.resolve().name, job_type="trial",
                               id=wandb_run_id(folder, True), resume="allow", dir=str(folder), config=config_values)
        started(tracker.start, config.report_to)
        tracker.tracker.summary.update(summary)
        tracker.finish()
    atomic_write_text(marker, logged)
