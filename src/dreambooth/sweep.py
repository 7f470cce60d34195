"""Sweeps: expand a grid into trials, share training runs and class images, resume; no training logic here.

Trials that differ only in `max_train_steps` are one training run that saves a pipeline at each requested
step; class images are generated once per (model, class prompt) before any run. Every stage leaves a
marker only when complete (the run's pipeline, the samples' grid.png, the trial's metric rows), so the
same command after a kill skips what is finished and continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth.config import ClassImagesConfig, GenerateConfig, SweepConfig, TrainConfig, class_images_config
from dreambooth.errors import UserError
from dreambooth.files import atomic_write_text, folder_lock, locked, read_jsonl, write_jsonl
from dreambooth.interrupts import StopRequest, Stopped, signal_name, stop_requests
from dreambooth.options import build_config, load_config_file
from dreambooth.sweep_files import (METRIC_ROWS, SWEEP_COPY, TRIALS, check_sweep_folder, fill_prompt,
                                    plain_class_prompt, read_trial_records)
from dreambooth.tracking import log_trial, sweep_logging_dir

# The sweep's own keys; every other key is a training setting. `identifier:` is both: it fills {id} in the
# prompts and is TrainConfig.identifier (the word whose embeddings --token-embedding-learning-rate trains).
SWEEP_KEYS = {"grid", "sampling", "prompts", "seeds", "class", "evaluation"}
SAMPLING_KEYS = {"steps", "guidance", "scheduler", "negative_prompt", "height", "width", "batch_size"}
EVALUATION_KEYS = {"clip_model", "dino_model", "enabled"}
SHORT_NAMES = {"learning_rate": "lr", "max_train_steps": "steps", "train_text_encoder": "te",
               "prior_loss_weight": "prior", "text_encoder_learning_rate": "telr", "lr_scheduler": "sched"}


@dataclass
class Trial:
    """One point of the grid: a run (shared by trials that differ only in steps) and the step to take."""

    name: str
    run: str
    step: int
    settings: dict[str, Any]  # the grid values of this trial
    status: str = "pending"
    error: str | None = None

    def record(self) -> dict[str, Any]:
        record = {"trial": self.name, "run": f"runs/{self.run}", "step": self.step, "settings": self.settings,
                  "status": self.status}
        return record | ({"error": self.error} if self.error else {})


@dataclass
class Sweep:
    """A parsed sweep file."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    sampling: dict[str, Any]
    prompts: list[str]
    seeds: list[int]
    identifier: str
    class_name: str
    evaluation: dict[str, Any] = field(default_factory=dict)

    @property
    def filled_prompts(self) -> list[str]:
        return [fill_prompt(prompt, self.identifier, self.class_name) for prompt in self.prompts]

    @property
    def class_prompt(self) -> str:
        """The plain class prompt whose images measure PRES (the training class prompt when there is one)."""
        return plain_class_prompt(self.base.get("class_prompt"), self.class_name) or ""


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every training key must be a `train` setting."""
    values = load_config_file(path)
    base = {key: value for key, value in values.items() if key not in SWEEP_KEYS}
    grid = values.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{path}: `grid:` must map training keys to non-empty lists, e.g. learning_rate: [1e-6, 3e-6]")
    sampling = values.get("sampling") or {}
    evaluation = values.get("evaluation") or {}
    for section, allowed, name in ((sampling, SAMPLING_KEYS, "sampling"), (evaluation, EVALUATION_KEYS, "evaluation")):
        unknown = set(section) - allowed
        if unknown:
            raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' under `{name}:` "
                            f"(known: {', '.join(sorted(allowed))})")
    for key in ("identifier", "class", "prompts"):
        if not values.get(key):
            raise UserError(f"{path}: `{key}:` is missing")
    sweep = Sweep(base=base, grid=grid, sampling=sampling, prompts=list(values["prompts"]),
                  seeds=list(values.get("seeds") or [0]), identifier=str(values["identifier"]),
                  class_name=str(values["class"]), evaluation=evaluation)
    for trial in expand_trials(sweep):  # every combination must be a valid training config
        train_config(sweep, trial, Path("."), source=str(path))
    generate_config(sweep, "pipeline", Path("."), source=f"{path}, `sampling:`")  # fail now, not after training
    return sweep


def expand_trials(sweep: Sweep) -> list[Trial]:
    """The grid's cross product; the run name leaves out max_train_steps so step variants share it."""
    keys = list(sweep.grid)
    trials = []
    for values in itertools.product(*(sweep.grid[key] for key in keys)):
        settings = dict(zip(keys, values))
        step = int(settings.get("max_train_steps", sweep.base.get("max_train_steps", TrainConfig.max_train_steps)))
        run_part = {k: v for k, v in settings.items() if k != "max_train_steps"}
        run = "-".join(f"{SHORT_NAMES.get(k, k)}{name_part(v)}" for k, v in run_part.items()) or "run"
        trials.append(Trial(name=f"{run}-steps{step}", run=run, step=step, settings=settings))
    return trials


def name_part(value: Any) -> str:
    """A grid value as it stands in a run or trial name, a folder name: booleans 0/1, no slashes or spaces."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_").replace(" ", "_")


def train_config(sweep: Sweep, trial: Trial, directory: Path, source: str = "sweep file",
                 steps: list[int] | None = None) -> TrainConfig:
    """The training settings of the run behind `trial` (trained to the largest of `steps`)."""
    values = {**sweep.base, **trial.settings}
    steps = steps or [trial.step]
    values.update(max_train_steps=max(steps), save_pipeline_at=sorted(set(steps) - {max(steps)}),
                  output=str(directory / "runs" / trial.run), resume=True)
    values["logging_dir"] = str(sweep_logging_dir(sweep.base.get("logging_dir"), directory) / "runs" / trial.run)
    values.setdefault("checkpoint_every", math.gcd(*steps))
    values.setdefault("keep_checkpoints", 1)
    if values.get("cache", True):
        # One latent folder for every run: trials over the same photos and VAE encode each crop once in all.
        values.setdefault("latent_cache_dir", str(directory / "latent_cache"))
    if float(values.get("prior_loss_weight", 1.0)) == 0.0:
        # A zero prior weight is training without prior preservation: skip the class images entirely.
        values.pop("class_prompt", None)
        values.pop("class_dir", None)
    elif values.get("class_prompt") and not values.get("class_dir"):
        values["class_dir"] = str(directory / "class_images" / slug(f"{values.get('model')}-{values['class_prompt']}"))
    return build_config(TrainConfig, values, {}, source=source)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:80]


def run_sweep(config: SweepConfig) -> Path:
    """Train, sample, evaluate and report every trial of the sweep; return the report's path. One process writes a
    sweep folder at a time; SIGTERM or Ctrl-C stops after the current training step or image (the same command
    continues)."""
    sweep = load_sweep(config.sweep)
    directory = Path(config.output)
    # A worker (--only-run) works in the folder its sweep holds; its run and its samples have locks of their own.
    lock = contextlib.nullcontext() if config.only_run else folder_lock(directory)
    with lock, stop_requests("training step or image") as request:
        return sweep_folder(config, sweep, directory, request)


def sweep_folder(config: SweepConfig, sweep: Sweep, directory: Path, request: StopRequest) -> Path:
    """`run_sweep` itself, holding the folder."""
    from dreambooth.class_images import top_up_class_images
    from dreambooth.report import write_report

    directory.mkdir(parents=True, exist_ok=True)
    trials = expand_trials(sweep)
    runs = group_runs(trials)
    if not config.only_run:  # a worker (--only-run) leaves the shared files to the process that started it
        check_sweep_folder(directory, Path(config.sweep))
        text = Path(config.sweep).read_text(encoding="utf-8")
        if not (directory / SWEEP_COPY).is_file() or (directory / SWEEP_COPY).read_text(encoding="utf-8") != text:
            atomic_write_text(directory / SWEEP_COPY, text)
        earlier = read_trial_records(directory)
        for trial in trials:  # a resumed sweep shows what was finished before, until it passes that trial again
            trial.status = earlier.get(trial.name, {}).get("status", "pending")
        write_jsonl(directory / TRIALS, [trial.record() for trial in trials])
        print(f"sweep: {len(trials)} trials from {len(runs)} training runs -> {directory}")

        # 1. Class images, once per (model, class prompt, folder) for every run that uses them.
        for class_config in unique_class_image_configs(sweep, trials, directory):
            top_up_class_images(class_config, flag="--class-dir")

    # 2. Each run: train once, then sample and evaluate each of its trials.
    if config.only_run:
        if config.only_run not in runs:
            raise UserError(f"--only-run {config.only_run}: no such run in this sweep ({', '.join(runs)})")
        run_each(sweep, {config.only_run: runs[config.only_run]}, directory, request)
        return directory / TRIALS
    if len(config.devices) > 1:
        run_on_devices(config, runs, directory, request)
    else:
        run_each(sweep, runs, directory, request)

    # 3. The report.
    stop_point(request, trials)
    html, _ = write_report(directory)
    print(f"sweep: report {html}")
    return html


def stop_point(request: StopRequest, trials: list[Trial]) -> None:
    """Between pieces of work: stop if a signal asked to, saying how far the sweep got."""
    if request.requested:
        done = sum(trial.status == "done" for trial in trials)
        request.stop(f"stopped after {done} of {len(trials)} trials ({signal_name(request.signum)}); "
                     "run the same command again to continue")


def run_each(sweep: Sweep, runs: dict[str, list[Trial]], directory: Path, request: StopRequest) -> None:
    """The runs one after another in this process."""
    clock = Progress(total_steps=sum(max(t.step for t in run_trials) for run_trials in runs.values()))
    models = None
    every_trial = [trial for run_trials in runs.values() for trial in run_trials]
    for index, (run, run_trials) in enumerate(runs.items(), start=1):
        steps = [trial.step for trial in run_trials]
        stop_point(request, every_trial)
        print(f"sweep: run {index}/{len(runs)} '{run}' (steps {', '.join(map(str, steps))}); {clock.estimate()}")
        try:
            run_paths = train_run(sweep, run_trials[0], directory, steps)
        except (UserError, Stopped):
            raise  # a mistake in the sweep file (every run would repeat it), or a stop request, stops the sweep
        except Exception as error:  # a crash in one run must not lose the others; the trials record why
            mark(run_trials, "failed", f"training: {type(error).__name__}: {error}", directory)
            continue
        clock.done(max(steps), run_paths)
        mark(run_trials, "trained", None, directory)
        for trial in run_trials:
            stop_point(request, every_trial)
            pipeline = run_paths.final_model if trial.step == max(steps) else run_paths.pipeline_at(trial.step)
            print(f"sweep: sampling trial '{trial.name}'")
            sample_trial(sweep, trial, pipeline, directory)
            if sweep.evaluation.get("enabled", True) and not is_evaluated(trial, directory):
                models = models or load_evaluation_models(sweep)
                evaluate_trial(sweep, trial, directory, models)
            logs = sweep_logging_dir(sweep.base.get("logging_dir"), directory)
            log_trial(train_config(sweep, trial, directory), directory, logs, trial.name,
                      {"run": trial.run, **trial.settings}, trial.step)
            mark([trial], "done", None, directory)


def run_on_devices(config: SweepConfig, runs: dict[str, list[Trial]], directory: Path, request: StopRequest) -> None:
    """One worker process per device, each taking the next run (`--only-run`) until none are left. A stop request
    is passed on to the workers (as SIGTERM: a second SIGINT would stop them at once), and no new one starts."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    free: queue.Queue[str] = queue.Queue()
    for device in config.devices:
        free.put(device)

    def work(run: str) -> None:
        device = free.get()
        try:
            if request.requested:
                return
            print(f"sweep: run '{run}' on device {device}")
            command = [sys.executable, "-m", "dreambooth", "sweep", str(config.sweep), "--output", str(directory),
                       "--only-run", run]
            worker = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": device})
            passed_on = False
            while (status := worker.poll()) is None:
                if request.requested and not passed_on:
                    worker.send_signal(signal.SIGTERM)
                    passed_on = True
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=0.5)
            if status != 0 and not request.requested:  # a stopped worker's trials keep their status
                mark(runs[run], "failed", f"worker on device {device} exited with status {status}", directory)
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=len(config.devices)) as pool:
        list(pool.map(work, runs))


def group_runs(trials: list[Trial]) -> dict[str, list[Trial]]:
    runs: dict[str, list[Trial]] = {}
    for trial in trials:
        runs.setdefault(trial.run, []).append(trial)
    return runs


def unique_class_image_configs(sweep: Sweep, trials: list[Trial], directory: Path) -> list[ClassImagesConfig]:
    """One class-image job per distinct folder, asking for the most images any run needs."""
    jobs: dict[str, ClassImagesConfig] = {}
    for run_trials in group_runs(trials).values():
        config = train_config(sweep, run_trials[0], directory)
        if not config.with_prior_preservation:
            continue
        job = class_images_config(config)
        if job.output not in jobs or jobs[job.output].num_images < job.num_images:
            jobs[job.output] = job
    return list(jobs.values())


def train_run(sweep: Sweep, trial: Trial, directory: Path, steps: list[int]):
    """Train (or finish training) the run behind `trial`; a finished run is not touched."""
    from dreambooth.checkpoints import RunPaths, is_trained_model
    from dreambooth.train import train

    config = train_config(sweep, trial, directory, steps=steps)
    paths = RunPaths(Path(config.output))
    wanted = [paths.final_model] + [paths.pipeline_at(step) for step in config.save_pipeline_at]
    if paths.config.is_file() and all(is_trained_model(p) for p in wanted):
        finished = read_jsonl(paths.metrics)
        if finished and finished[-1]["step"] == config.max_train_steps:
            print(f"sweep: run '{trial.run}' already trained")
            return paths
    return train(config, tracker_group=Path(directory).resolve().name)


def sample_trial(sweep: Sweep, trial: Trial, pipeline: Path, directory: Path) -> Path:
    """`generate` the trial's prompts (and the plain class prompt, for PRES) with every sampling setting."""
    from dreambooth.sampling import GRID, generate, generation_difference

    output = directory / "samples" / trial.name
    if (output / GRID).is_file():
        return output
    config = generate_config(sweep, str(pipeline), output)
    # A sampling a killed sweep left half done continues; one with other settings (the sweep file was edited since)
    # is moved aside into the folder's replaced-<time>/.
    if generation_difference(output, config):
        config = dataclasses.replace(config, overwrite=True)
    return generate(config)


def generate_config(sweep: Sweep, model: str, output: Path, source: str = "sweep file, `sampling:`") -> GenerateConfig:
    """A trial's `generate` settings: its prompts (plus the class prompt, for PRES) and seeds, and only the
    sampling keys the sweep file gives, so GenerateConfig's own defaults fill in the rest."""
    prompts = sweep.filled_prompts
    if sweep.evaluation.get("enabled", True) and sweep.class_prompt not in prompts:
        prompts.append(sweep.class_prompt)
    values = {**sweep.sampling, "model": model, "prompt": prompts, "output": str(output), "seeds": sweep.seeds}
    return build_config(GenerateConfig, values, {}, source=source)


def load_evaluation_models(sweep: Sweep):
    from dreambooth.config import EvaluateConfig
    from dreambooth.metrics import load_embedding_models

    defaults = EvaluateConfig(samples=".", reference_dir=".")
    return load_embedding_models(sweep.evaluation.get("clip_model", defaults.clip_model),
                                 sweep.evaluation.get("dino_model", defaults.dino_model))


def evaluate_trial(sweep: Sweep, trial: Trial, directory: Path, models) -> None:
    """Append the trial's metric rows to DIR/metrics.jsonl (rewritten whole, so a kill never leaves half a trial)."""
    from dreambooth.metrics import evaluate_samples

    path = directory / METRIC_ROWS
    new_rows = evaluate_samples(directory / "samples" / trial.name, Path(sweep.base["instance_dir"]), models,
                                class_prompt=sweep.class_prompt)
    with locked(directory / ".sweep.lock"):
        rows = [row for row in read_jsonl(path) if row.get("trial") != trial.name]
        rows += [{"trial": trial.name, **row} for row in new_rows]
        write_jsonl(path, rows)


def is_evaluated(trial: Trial, directory: Path) -> bool:
    return any(row.get("trial") == trial.name for row in read_jsonl(directory / METRIC_ROWS))


def mark(changed: list[Trial], status: str, error: str | None, directory: Path) -> None:
    """Set the status of some trials in DIR/trials.jsonl (under a lock: several workers may share the sweep)."""
    with locked(directory / ".sweep.lock"):
        records = read_trial_records(directory)
        for trial in changed:
            trial.status, trial.error = status, error
            records[trial.name] = trial.record()
        write_jsonl(directory / TRIALS, records.values())


@dataclass
class Progress:
    """Time left, estimated from the seconds per training step measured so far."""

    total_steps: int
    steps_done: int = 0
    seconds: float = 0.0

    def done(self, steps: int, paths) -> None:
        records = read_jsonl(paths.metrics)
        self.steps_done += steps
        self.seconds += records[-1]["seconds"] if records else 0.0

    def estimate(self) -> str:
        if not self.steps_done or not self.seconds:
            return f"{self.total_steps} training steps to go"
        left = (self.total_steps - self.steps_done) * self.seconds / self.steps_done
        return f"{self.total_steps - self.steps_done} training steps to go, about {left / 60:.0f} min of training left"
