"""DreamBooth training: one loop that reads top to bottom.

Every random draw of step s (data order, crops, latents, noise, timesteps) comes from generators seeded
by (seed, s), so a run resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from dreambooth import __version__, seeds
from dreambooth.artifacts import write_loss_plot, write_model_card
from dreambooth.checkpoints import (RunPaths, claim_run_folder, load_latest_checkpoint, save_checkpoint,
                                    save_only_trainable_weights, truncate_metrics)
from dreambooth.class_images import top_up_class_images
from dreambooth.config import TrainConfig, class_images_config
from dreambooth.data import DreamBoothData, load_examples, load_masks
from dreambooth.encoding import warn_long_prompts
from dreambooth.errors import UserError
from dreambooth.files import append_jsonl, atomic_dir, atomic_write_text, folder_lock
from dreambooth.interrupts import StopRequest, Stopped, signal_name, stop_requests
from dreambooth.models import (Components, assemble_pipeline, check_latent_size, check_trainable, default_device,
                               load_components, native_resolution, resolve_model,
                               source_vae_scale_factor)
from dreambooth.optimizers import check_optimizer, make_optimizer, optimizer_settings
from dreambooth.options import RUN_RECORD, to_dict
from dreambooth.prepare import (OFFLOAD_DEVICE, TEXT_ENCODERS, allow_tf32, cached_encoders, fill_caches,
                                learning_rate_schedule, make_accelerator, parameter_groups,
                                prepare_models, trainable)
from dreambooth.preview import data_warnings
from dreambooth.sampling import SamplingSetting, render, save_png
from dreambooth.saving import save_trained
from dreambooth.step import micro_batch_loss, step_settings
from dreambooth.tracking import RunTracking, metrics_record, start_run_tracking

VALIDATION_SCHEDULER = "ddim"
VALIDATION_GUIDANCE = 7.5  # Stable Diffusion's usual guidance scale
NOISE_STREAM = 4  # seeds.mix stream of the step's latents, noise and timesteps (data.py uses streams 0-3)


@dataclass
class StepResult:
    """What one optimizer step reports: 0-dim tensors on the device, read (`float`) only when written."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None
    lr: float  # the UNet's learning rate in this step
    text_encoder_lr: float | None  # the text encoders' rate, when they train
    grad_norm: torch.Tensor | None  # before clipping; None if no micro-batch synchronised the gradients
    skipped: bool = False  # --on-nan skip left this step's update out


def train(config: TrainConfig, tracker_group: str | None = None) -> RunPaths:
    """Fine-tune `config.model` on the instance images and write a RUN folder; return its paths. A second
    process on the same folder, running out of GPU memory or disk space, ends in one line (a UserError);
    SIGTERM or Ctrl-C ends in a checkpoint and `Stopped`, whose message is the command that resumes.
    `tracker_group` groups the run with others in wandb (a sweep's runs)."""
    from accelerate import PartialState

    # One writer per run folder: the main process holds its lock for the whole run.
    with (folder_lock(Path(config.output)) if PartialState().is_main_process else contextlib.nullcontext(),
          stop_requests("optimizer step") as stop):
        try:
            return train_run(config, stop, tracker_group)
        except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError from torch 2.5 on; this name in 2.4 too
            raise UserError(out_of_memory_line(config, error)) from error
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Every write is atomic and its temporary file removed on failure, so what is complete stays so.
            where = f" writing {error.filename}" if error.filename else ""
            paths = RunPaths(Path(config.output))
            then = f"continue with {resume_command(paths)}" if paths.config.is_file() else "run the same command again"
            raise UserError(f"the disk is full{where}; nothing complete was replaced: free some space, then {then}"
                            ) from error


def resume_command(paths: RunPaths) -> str:
    """The command that continues the run in `paths`: its own record of settings, with --resume."""
    return f"dreambooth train --config {paths.config} --resume"


def out_of_memory_line(config: TrainConfig, error: Exception) -> str:
    """The one line an out-of-memory error ends with: what the run needs, what the GPU has, what would fit."""
    from dreambooth.memory import out_of_memory_message

    device = default_device()
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return out_of_memory_message(config, total, str(error))


def train_run(config: TrainConfig, stop: StopRequest, tracker_group: str | None = None) -> RunPaths:
    """`train` itself; `stop` is asked after every optimizer step."""
    # 1. Claim the run folder before any slow work, so a mistake there fails at once.
    source = resolve_model(config.model, config.allow_pickle, config.model_config, revision=config.revision,
                           variant=config.variant)
    check_trainable(source)
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=native_resolution(source))
    check_latent_size(source_vae_scale_factor(source), {"--resolution": config.resolution})
    accelerator = make_accelerator(config)
    allow_tf32(accelerator.device)
    check_optimizer(optimizer_settings(config), accelerator.device)
    paths = RunPaths(Path(config.output))
    settings = to_dict(config)
    if accelerator.is_main_process:
        claim_run_folder(paths, settings, config.resume, config.overwrite)
    accelerator.wait_for_everyone()

    # 2. Data: read every instance image now (a broken file fails here), then top up the class images
    #    (on the main process first, so the other processes find the folder full).
    instance = load_examples(config.instance_dir, config.instance_prompt, "--instance-dir")
    if config.instance_mask_dir:
        instance = load_masks(instance, config.instance_mask_dir, "--instance-mask-dir")
    classes = None
    if config.with_prior_preservation:
        with accelerator.main_process_first():
            top_up_class_images(class_images_config(config), flag="--class-dir")
        classes = load_examples(config.class_dir, config.class_prompt, "--class-dir", limit=config.num_class_images)
    data = DreamBoothData(instance, classes, config.resolution, config.center_crop, config.random_flip, config.seed)
    if accelerator.is_main_process:  # what `inspect-data` warns about, without its contact sheet
        for line in data_warnings(instance, classes, config.resolution, config.center_crop):
            print(f"warning: {line}", file=sys.stderr)

    # 3. Models: everything frozen except what this run trains.
    components = load_components(source, vae=config.vae)
    name_long_prompts(components.tokenizer, config, instance + (classes or []))
    trained = prepare_models(components, config, accelerator)

    # 4. Optimizer and learning-rate schedule.
    optimizer = make_optimizer(parameter_groups(components, config), optimizer_settings(config), accelerator.device)
    lr_schedule = learning_rate_schedule(optimizer, config, accelerator.num_processes)
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_schedule)
    for name, module in zip(trained, prepared):
        setattr(components, name, module)
    optimizer, lr_schedule = prepared[-2], prepared[-1]

    # 5. Record the settings, or resume from the newest checkpoint (dropping the metric lines of later steps,
    #    all of them when there is no checkpoint: they will be trained again).
    start_step, seconds_before, skips_before = 0, 0.0, 0
    if config.uses_lora:
        save_only_trainable_weights(accelerator)
    if config.resume:
        start_step = load_latest_checkpoint(accelerator, paths, prepared[:-2] if config.uses_lora else None)
        seconds_before, skips_before = truncate_metrics(paths, start_step)
        print(f"resuming {paths.root} at step {start_step}" if start_step
              else "--resume: no checkpoint yet; starting at step 0")
    record = run_record(config, components)
    if accelerator.is_main_process:
        atomic_write_text(paths.config, yaml.safe_dump(record, sort_keys=False))
    step_models = cached_encoders(components, config)
    if start_step >= config.max_train_steps:
        print(f"{paths.root} already reached step {start_step}; nothing to train")
        offloaded = []
    else:
        offloaded = fill_caches(step_models, data, accelerator)
    # After RUN/config.yaml, so a tracker that cannot start leaves a run that --resume continues.
    tracked = start_run_tracking(accelerator, config, record, start_step, seconds_before, tracker_group,
                                 then=f"; then continue with {resume_command(paths)}")

    # 6. The loop: encode -> noise -> predict -> loss -> step. The losses stay on the device until a flush
    #    (every --log-every steps, and before anything that must see every step recorded), so the GPU never
    #    waits for the host in between.
    started = time.monotonic()
    progress = tqdm(initial=start_step, total=config.max_train_steps, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    pending: list[tuple[int, StepResult, float]] = []
    skips, last_checkpoint = skips_before, started
    try:
        for step in range(start_step + 1, config.max_train_steps + 1):
            result = train_step(step, step_models, trained, data, optimizer, lr_schedule, accelerator, config)
            pending.append((step, result, seconds_before + time.monotonic() - started))
            progress.update(1)
            minutes = (time.monotonic() - last_checkpoint) / 60
            stopping, timed = agreed(accelerator, stop.requested, 0 < config.checkpoint_minutes <= minutes)
            checkpoint = needs_checkpoint(step, config) or timed or stopping
            validation = needs_validation(step, config) and not stopping
            saves = step in config.save_pipeline_at and step < config.max_train_steps
            if step % config.log_every == 0 or checkpoint or validation or saves:
                last_loss, skips = write_metrics(pending, paths, accelerator, skips, tracked)
                progress.set_postfix(loss="-" if last_loss is None else f"{last_loss:.4f}",
                                     **({"skipped": skips} if skips else {}))
                pending = []
            if saves and accelerator.is_main_process:
                save_trained(components, trained, accelerator, paths.pipeline_at(step), config)
            if checkpoint:
                save_checkpoint(accelerator, paths, step, config.keep_checkpoints)
                last_checkpoint = time.monotonic()
            if stopping:
                signum = stop.signum or signal.SIGTERM  # a process that did not see the signal stops with the rest
                raise Stopped(signum, f"stopped at step {step} of {config.max_train_steps} ({signal_name(signum)}); "
                                      f"checkpoint {paths.checkpoint(step)}; continue with: {resume_command(paths)}")
            if validation:
                tracked.log_validation(step, write_validation_images(components, accelerator, paths, step, config,
                                                                     offloaded))
    except BaseException:
        tracked.finish(failed=True)  # wandb shows the run failed; --resume continues it
        raise
    finally:  # the bar's line ends however the loop does, so an error prints on a line of its own
        progress.close()

    # 7. The fine-tuned pipeline, loss curve and model card (after the last step's checkpoint: a failure here is
    #    one --resume away).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_trained(components, trained, accelerator, paths.lora if config.uses_lora else paths.pipeline, config)
        write_loss_plot(paths.metrics, paths.loss_plot)
        write_model_card(paths, settings)
    accelerator.end_training()
    return paths


def name_long_prompts(tokenizer, config: TrainConfig, examples: list) -> None:
    """Warn once about each prompt the text encoder will cut short, by the flag that gave it or its caption file
    (the flags first: a caption that repeats --instance-prompt is named by the flag)."""
    for flag, prompts in (("--instance-prompt", [config.instance_prompt]),
                          ("--class-prompt", [config.class_prompt] if config.class_prompt else []),
                          ("--validation-prompt", config.validation_prompt)):
        warn_long_prompts(tokenizer, prompts, flag)
    for example in examples:
        warn_long_prompts(tokenizer, [example.prompt], str(example.path.with_suffix(".txt")))


def step_generator(seed: int, step: int, micro_step: int, process: int) -> torch.Generator:
    """The random stream of one micro-batch on one process: a pure function of its coordinates."""
    return seeds.generator(seed, NOISE_STREAM, step, micro_step, process)


def sample_ids(step: int, micro_step: int, config: TrainConfig, accelerator) -> list[int]:
    """Which examples a micro-batch sees: consecutive ids, so every process and step gets different ones."""
    per_step = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    slot = micro_step * accelerator.num_processes + accelerator.process_index
    first = (step - 1) * per_step + slot * config.train_batch_size
    return list(range(first, first + config.train_batch_size))


def train_step(step: int, components: Components, trained: dict[str, torch.nn.Module], data: DreamBoothData,
               optimizer, lr_schedule, accelerator, config: TrainConfig) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean losses."""
    settings = step_settings(config)
    rates = lr_schedule.get_last_lr()  # the rates this step applies (the schedule moves on after it): UNet first
    totals: dict[str, Any] = {"loss": 0.0, "instance": 0.0, "prior": 0.0}
    has_prior, grad_norm, skipped = False, None, False
    for micro_step in range(config.gradient_accumulation_steps):
        batch = data.batch(sample_ids(step, micro_step, config, accelerator))
        generator = step_generator(config.seed, step, micro_step, accelerator.process_index)
        with accelerator.accumulate(*trained.values()):
            parts = micro_batch_loss(batch, generator, components, settings, accelerator.device, accelerator.autocast)
            accelerator.backward(parts.loss)
            if accelerator.sync_gradients:
                params = [p for module in trained.values() for p in trainable(module)]
                # An infinite limit measures the norm without clipping it.
                grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
                # --on-nan skip reads the norm now (one wait for the GPU per step, only then). fp16's grad scaler
                # skips non-finite updates itself and must see them to lower its scale.
                skipped = (config.on_nan == "skip" and accelerator.scaler is None
                           and not bool(torch.isfinite(grad_norm) & torch.isfinite(parts.loss.detach())))
            if not skipped:
                optimizer.step()
            lr_schedule.step()  # a skipped step still counts, so the schedule and the step numbers stay together
            optimizer.zero_grad(set_to_none=True)
        # Summed on the device (gather is a no-op on one process); read later, a flush at a time.
        totals["loss"] += accelerator.gather(parts.loss.detach()).mean()
        totals["instance"] += accelerator.gather(parts.instance_loss.detach()).mean()
        if parts.prior_loss is not None:
            has_prior = True
            totals["prior"] += accelerator.gather(parts.prior_loss.detach()).mean()
    count = config.gradient_accumulation_steps
    return StepResult(totals["loss"] / count, totals["instance"] / count,
                      totals["prior"] / count if has_prior else None, rates[0],
                      rates[1] if config.train_text_encoder else None,
                      grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm, skipped)


def write_metrics(pending: list[tuple[int, StepResult, float]], paths: RunPaths, accelerator,
                  skips: int, tracked: RunTracking | None = None) -> tuple[float | None, int]:
    """Read the pending steps' numbers off the device (one wait for the GPU), append them to metrics.jsonl
    (main process) and log them to the trackers, and return the last loss recorded and the run's count of
    skipped steps so far.

    A non-finite loss or gradient norm in a step that was not skipped stops the run with one line: nothing after
    the step before it is saved, so the newest checkpoint and metrics.jsonl (always valid JSON) stay finite."""
    records = []
    for step, result, seconds in pending:
        skips += result.skipped
        record = metrics_record(step, result, seconds, skips)
        # fp16's grad scaler skips a non-finite gradient itself (and lowers its scale): not a reason to stop.
        checked = ("loss", "instance_loss", "prior_loss") + (("grad_norm",) if accelerator.scaler is None else ())
        broken = [name for name in checked if record.get(name) is None and name in record]
        if broken and not result.skipped:
            if accelerator.is_main_process:
                for kept in records:
                    append_jsonl(paths.metrics, kept)
            if tracked:
                tracked.log_steps(records)
            what = "loss" if "loss" in broken else "gradient norm"
            value = result.loss if what == "loss" else result.grad_norm
            raise UserError(f"step {step}: the {what} is {float(value)}, training stopped (nothing after step "
                            f"{step - 1} was saved); try a lower --learning-rate, --mixed-precision bf16 or no "
                            "instead of fp16, an fp16-safe --vae, or --on-nan skip")
        records.append(record)
    if accelerator.is_main_process:
        for record in records:
            append_jsonl(paths.metrics, record)
    if tracked:
        tracked.log_steps(records)
    losses = [record["loss"] for record in records if record["loss"] is not None]
    return (losses[-1] if losses else None), skips


def needs_checkpoint(step: int, config: TrainConfig) -> bool:
    """A checkpoint every --checkpoint-every steps, and always at the last one (written before the final pipeline,
    it makes a failed final save one --resume away, and lets a finished run be extended)."""
    periodic = config.checkpoint_every > 0 and step % config.checkpoint_every == 0
    return periodic or step == config.max_train_steps


def agreed(accelerator, *flags: bool) -> tuple[bool, ...]:
    """`flags` as every process sees them (any process's True counts): a signal or a clock can reach processes
    a step apart, and a checkpoint that only some of them write would hang the others."""
    if accelerator.num_processes == 1:
        return flags
    votes = accelerator.reduce(torch.tensor([float(flag) for flag in flags], device=accelerator.device), "max")
    return tuple(bool(vote) for vote in votes.tolist())


def needs_validation(step: int, config: TrainConfig) -> bool:
    if not config.validation_prompt:
        return False
    periodic = config.validation_every > 0 and step % config.validation_every == 0
    return periodic or step == config.max_train_steps


def write_validation_images(components: Components, accelerator, paths: RunPaths, step: int, config: TrainConfig,
                            offloaded: list = ()) -> list[tuple[str, str, Any]]:
    """Render the validation prompts with fixed seeds into validation/step-NNNNNN/, with the encoders that
    `offloaded` caches moved off the device brought back for it (and sent away again after). Return each
    image's (name, prompt, image) for the trackers (none on the other processes)."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return []
    for cache in offloaded:
        cache.restore()
    unwrapped = {name: accelerator.unwrap_model(getattr(components, name)) for name in ("unet",) + TEXT_ENCODERS
                 if getattr(components, name) is not None}
    view = Components(**{**components.__dict__, **unwrapped})
    pipeline = assemble_pipeline(view)
    setting = SamplingSetting(config.validation_sampling_steps, VALIDATION_GUIDANCE, VALIDATION_SCHEDULER)
    for module in unwrapped.values():
        module.eval()
    written = []
    with atomic_dir(paths.validation_step(step)) as folder, accelerator.autocast():
        for index, prompt in enumerate(config.validation_prompt):
            seeds = list(config.validation_seeds)
            images = render(pipeline, [prompt] * len(seeds), seeds, setting,
                            height=config.resolution, width=config.resolution, batch_size=len(seeds))
            for seed, image in zip(seeds, images):
                written.append((f"p{index}-seed{seed}", prompt, image))
                save_png(image, folder / f"{written[-1][0]}.png",
                         {"prompt": prompt, "seed": seed, "steps": setting.steps, "guidance": setting.guidance,
                          "scheduler": setting.scheduler, "model": config.model, "training_step": step})
    for name in trained_names(components, config):
        unwrapped[name].train()
    for cache in offloaded:
        cache.offload(OFFLOAD_DEVICE)
    accelerator.wait_for_everyone()
    return written


def trained_names(components: Components, config: TrainConfig) -> list[str]:
    encoders = [name for name in TEXT_ENCODERS if getattr(components, name) is not None]
    return ["unet"] + (encoders if config.train_text_encoder else [])


def run_record(config: TrainConfig, components: Components) -> dict[str, Any]:
    """RUN/config.yaml: every resolved setting plus what the run was made from."""
    # --resume and --overwrite are what one command did, not settings: RUN/config.yaml resumes the run as a --config.
    record = {**to_dict(config), "resume": False, "overwrite": False}
    record[RUN_RECORD] = {
        "dreambooth_version": __version__,
        "base_model": components.source.requested,
        "base_model_kind": components.source.kind,
        "base_model_location": components.source.base_record()["model"],
        "family": components.family,
        "prediction_type": components.prediction_type,
    }
    return record
