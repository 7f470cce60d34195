"""DreamBooth training: one loop that reads top to bottom.

Every random draw of step s (data order, crops, latents, noise, timesteps) comes from generators seeded
by (seed, s), so a run resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dreambooth import __version__, lora, seeds
from dreambooth.artifacts import write_loss_plot, write_model_card
from dreambooth.checkpoints import (RunPaths, claim_run_folder, load_latest_checkpoint, save_checkpoint,
                                    save_only_trainable_weights, truncate_metrics)
from dreambooth.class_images import top_up_class_images
from dreambooth.config import TrainConfig, class_images_config
from dreambooth.data import DreamBoothData, load_examples, load_masks
from dreambooth.files import append_jsonl, atomic_dir, atomic_write_text, folder_lock
from dreambooth.errors import UserError
from dreambooth.models import (Components, assemble_pipeline, check_trainable, default_device, load_components,
                               load_pipeline, native_resolution, resolve_model)
from dreambooth.optimizers import check_optimizer, make_optimizer, optimizer_settings
from dreambooth.options import to_dict
from dreambooth.prepare import (OFFLOAD_DEVICE, TEXT_ENCODERS, allow_tf32, cached_encoders, fill_caches,
                                identifier_rows, learning_rate_schedule, make_accelerator, parameter_groups,
                                prepare_models, trainable)
from dreambooth.sampling import SamplingSetting, render, save_png
from dreambooth.step import micro_batch_loss, step_settings

VALIDATION_SCHEDULER = "ddim"
VALIDATION_GUIDANCE = 7.5  # Stable Diffusion's usual guidance scale
NOISE_STREAM = 4  # seeds.mix stream of the step's latents, noise and timesteps (data.py uses streams 0-3)
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --save-dtype


@dataclass
class StepResult:
    """What one optimizer step reports: 0-dim tensors on the device, read (`float`) only when written."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None
    lr: float  # the UNet's learning rate in this step
    grad_norm: torch.Tensor | None  # before clipping; None if no micro-batch synchronised the gradients


def train(config: TrainConfig) -> RunPaths:
    """Fine-tune `config.model` on the instance images and write a RUN folder; return its paths. A second
    process on the same folder, or running out of GPU memory, ends in one line (a UserError)."""
    from accelerate import PartialState

    # One writer per run folder: the main process holds its lock for the whole run.
    with folder_lock(Path(config.output)) if PartialState().is_main_process else contextlib.nullcontext():
        try:
            return train_run(config)
        except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError from torch 2.5 on; this name in 2.4 too
            raise UserError(out_of_memory_line(config, error)) from error


def out_of_memory_line(config: TrainConfig, error: Exception) -> str:
    """The one line an out-of-memory error ends with: what the run needs, what the GPU has, what would fit."""
    from dreambooth.memory import out_of_memory_message

    device = default_device()
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return out_of_memory_message(config, total, str(error))


def train_run(config: TrainConfig) -> RunPaths:
    """`train` itself."""
    # 1. Claim the run folder before any slow work, so a mistake there fails at once.
    source = resolve_model(config.model, config.allow_pickle, config.model_config)
    check_trainable(source)
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=native_resolution(source))
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
            top_up_class_images(class_images_config(config))
        classes = load_examples(config.class_dir, config.class_prompt, "--class-dir", limit=config.num_class_images)
    data = DreamBoothData(instance, classes, config.resolution, config.center_crop, config.random_flip, config.seed)

    # 3. Models: everything frozen except what this run trains.
    components = load_components(source, vae=config.vae)
    trained = prepare_models(components, config, accelerator)

    # 4. Optimizer and learning-rate schedule.
    optimizer = make_optimizer(parameter_groups(components, config), optimizer_settings(config), accelerator.device)
    lr_schedule = learning_rate_schedule(optimizer, config, accelerator.num_processes)
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_schedule)
    for name, module in zip(trained, prepared):
        setattr(components, name, module)
    optimizer, lr_schedule = prepared[-2], prepared[-1]
    step_models = cached_encoders(components, config)
    offloaded = fill_caches(step_models, data, accelerator)

    # 5. Record the settings, or resume from the newest checkpoint.
    start_step, seconds_before = 0, 0.0
    if config.uses_lora:
        save_only_trainable_weights(accelerator)
    if config.resume:
        start_step = load_latest_checkpoint(accelerator, paths, prepared[:-2] if config.uses_lora else None)
        seconds_before = truncate_metrics(paths, start_step) if start_step else 0.0
        print(f"resuming {paths.root} at step {start_step}" if start_step
              else "--resume: no checkpoint yet; starting at step 0")
    if accelerator.is_main_process:
        atomic_write_text(paths.config, run_record(config, components))
    if start_step >= config.max_train_steps:
        print(f"{paths.root} already reached step {start_step}; nothing to train")

    # 6. The loop: encode -> noise -> predict -> loss -> step. The losses stay on the device until a flush
    #    (every --log-every steps, and before anything that must see every step recorded), so the GPU never
    #    waits for the host in between.
    started = time.monotonic()
    progress = tqdm(initial=start_step, total=config.max_train_steps, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    pending: list[tuple[int, StepResult, float]] = []
    try:
        for step in range(start_step + 1, config.max_train_steps + 1):
            result = train_step(step, step_models, trained, data, optimizer, lr_schedule, accelerator, config)
            pending.append((step, result, seconds_before + time.monotonic() - started))
            progress.update(1)
            checkpoint, validation = needs_checkpoint(step, config), needs_validation(step, config)
            saves = step in config.save_pipeline_at and step < config.max_train_steps
            if step % config.log_every == 0 or checkpoint or validation or saves or step == config.max_train_steps:
                last_loss = write_metrics(pending, paths, accelerator)
                progress.set_postfix(loss=f"{last_loss:.4f}")
                pending = []
            if saves and accelerator.is_main_process:
                save_trained(components, trained, accelerator, paths.pipeline_at(step), config)
            if checkpoint:
                save_checkpoint(accelerator, paths, step, config.keep_checkpoints)
            if validation:
                write_validation_images(components, accelerator, paths, step, config, offloaded)
    finally:  # the bar's line ends however the loop does, so an error prints on a line of its own
        progress.close()

    # 7. The fine-tuned pipeline, loss curve and model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_trained(components, trained, accelerator, paths.lora if config.uses_lora else paths.pipeline, config)
        write_loss_plot(paths.metrics, paths.loss_plot)
        write_model_card(paths, settings)
    accelerator.end_training()
    return paths


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
    lr = lr_schedule.get_last_lr()[0]  # the rate this step applies (the schedule moves on after it)
    totals: dict[str, Any] = {"loss": 0.0, "instance": 0.0, "prior": 0.0}
    has_prior, grad_norm = False, None
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
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        # Summed on the device (gather is a no-op on one process); read later, a flush at a time.
        totals["loss"] += accelerator.gather(parts.loss.detach()).mean()
        totals["instance"] += accelerator.gather(parts.instance_loss.detach()).mean()
        if parts.prior_loss is not None:
            has_prior = True
            totals["prior"] += accelerator.gather(parts.prior_loss.detach()).mean()
    count = config.gradient_accumulation_steps
    return StepResult(totals["loss"] / count, totals["instance"] / count,
                      totals["prior"] / count if has_prior else None, lr,
                      grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm)


def write_metrics(pending: list[tuple[int, StepResult, float]], paths: RunPaths, accelerator) -> float:
    """Read the pending steps' numbers off the device (one wait for the GPU), append them to metrics.jsonl
    (main process), and return the last step's loss."""
    records = [metrics_record(step, result, seconds) for step, result, seconds in pending]
    broken = next((record for record in records if not all(math.isfinite(record[name]) for name in
                                                            ("loss", "instance_loss", "prior_loss", "grad_norm")
                                                            if record.get(name) is not None)), None)
    if accelerator.is_main_process:
        for record in records[: records.index(broken) if broken else len(records)]:
            append_jsonl(paths.metrics, record)
    if broken:
        # Nothing after this step is saved: the newest checkpoint (and metrics.jsonl, always valid JSON) stay
        # those of finite steps.
        what = "loss" if not math.isfinite(broken["loss"]) else "gradient norm"
        value = broken["loss"] if what == "loss" else broken["grad_norm"]
        raise UserError(f"step {broken['step']}: the {what} is {value}, training stopped (nothing after step "
                        f"{broken['step'] - 1} was saved); try a lower --learning-rate, --mixed-precision bf16 or no "
                        "instead of fp16, or an fp16-safe --vae")
    return records[-1]["loss"]


def needs_checkpoint(step: int, config: TrainConfig) -> bool:
    return config.checkpoint_every > 0 and step % config.checkpoint_every == 0 and step < config.max_train_steps


def needs_validation(step: int, config: TrainConfig) -> bool:
    if not config.validation_prompt:
        return False
    periodic = config.validation_every > 0 and step % config.validation_every == 0
    return periodic or step == config.max_train_steps


def metrics_record(step: int, result: StepResult, seconds: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "loss": float(result.loss), "instance_loss": float(result.instance_loss)}
    if result.prior_loss is not None:
        record["prior_loss"] = float(result.prior_loss)
    grad_norm = float(result.grad_norm) if result.grad_norm is not None else None
    record.update(lr=result.lr, grad_norm=grad_norm, seconds=round(seconds, 3))
    return record


def write_validation_images(components: Components, accelerator, paths: RunPaths, step: int, config: TrainConfig,
                            offloaded: list = ()) -> None:
    """Render the validation prompts with fixed seeds into validation/step-NNNNNN/, with the encoders that
    `offloaded` caches moved off the device brought back for it (and sent away again after)."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    for cache in offloaded:
        cache.restore()
    unwrapped = {name: accelerator.unwrap_model(getattr(components, name)) for name in ("unet",) + TEXT_ENCODERS
                 if getattr(components, name) is not None}
    view = Components(**{**components.__dict__, **unwrapped})
    pipeline = assemble_pipeline(view)
    setting = SamplingSetting(config.validation_sampling_steps, VALIDATION_GUIDANCE, VALIDATION_SCHEDULER)
    for module in unwrapped.values():
        module.eval()
    with atomic_dir(paths.validation_step(step)) as folder, accelerator.autocast():
        for index, prompt in enumerate(config.validation_prompt):
            seeds = list(config.validation_seeds)
            images = render(pipeline, [prompt] * len(seeds), seeds, setting,
                            height=config.resolution, width=config.resolution, batch_size=len(seeds))
            for seed, image in zip(seeds, images):
                save_png(image, folder / f"p{index}-seed{seed}.png",
                         {"prompt": prompt, "seed": seed, "steps": setting.steps, "guidance": setting.guidance,
                          "scheduler": setting.scheduler, "training_step": step})
    for name in trained_names(components, config):
        unwrapped[name].train()
    for cache in offloaded:
        cache.offload(OFFLOAD_DEVICE)
    accelerator.wait_for_everyone()


def trained_names(components: Components, config: TrainConfig) -> list[str]:
    encoders = [name for name in TEXT_ENCODERS if getattr(components, name) is not None]
    return ["unet"] + (encoders if config.train_text_encoder else [])


def save_trained(components: Components, trained: dict[str, torch.nn.Module], accelerator, target: Path,
                 config: TrainConfig) -> None:
    """What the run trained, into `target`: a whole pipeline (diffusers format), or a LoRA folder."""
    unwrapped = {name: accelerator.unwrap_model(getattr(components, name)) for name in trained}
    dtype = SAVE_DTYPES[config.save_dtype]
    with atomic_dir(target) as folder:
        if not config.uses_lora:
            # The base pipeline (and --vae) loaded afresh in the saved dtype, with the fine-tuned parts swapped in
            # (fp32 as they train, or copies in the saved dtype: the weights that go on training are never rounded).
            parts = unwrapped if dtype == torch.float32 else {name: saved_copy(module, dtype)
                                                               for name, module in unwrapped.items()}
            pipeline = load_pipeline(components.source, vae=config.vae, torch_dtype=dtype, **parts)
            pipeline.save_pretrained(folder, safe_serialization=True)
            return
        embeddings = {}
        if config.token_embedding_learning_rate:
            for name in (name for name in TEXT_ENCODERS if name in unwrapped):
                suffix = name.removeprefix("text_encoder")  # "" or "_2"
                rows = lora.trained_embeddings(unwrapped[name], identifier_rows(components, name, config))
                embeddings.update({f"{key}{suffix}": value for key, value in rows.items()})
        lora.save_lora(folder, components.pipeline_class, unwrapped, components.source.base_record(),
                       embeddings or None, dtype)


def saved_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy of a trained model in `dtype`, built empty (meta device) and given converted copies of its
    weights one tensor at a time: saving in half never holds a second copy on the GPU."""
    model_class = type(module)
    with torch.device("meta"):
        # diffusers models are built from their config with from_config, transformers models by calling the class
        copy = model_class.from_config(module.config) if hasattr(model_class, "from_config") else model_class(
            module.config)
    copy.load_state_dict({key: value.detach().to("cpu", dtype) for key, value in module.state_dict().items()},
                         assign=True)
    return copy


def run_record(config: TrainConfig, components: Components) -> str:
    """RUN/config.yaml: every resolved setting plus what the run was made from."""
    import yaml

    record = to_dict(config)
    record["_run"] = {
        "dreambooth_version": __version__,
        "base_model": components.source.requested,
        "base_model_kind": components.source.kind,
        "base_model_location": components.source.base_record()["model"],
        "family": components.family,
        "prediction_type": components.prediction_type,
    }
    return yaml.safe_dump(record, sort_keys=False)
