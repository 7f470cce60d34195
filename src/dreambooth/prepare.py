"""Setting a run up: the Accelerator, which parts train and in which dtype, LoRA adapters, the caches the step
computes with, the optimizer's parameter groups and schedule, and the device's fast paths.

`train.py` runs the loop over what these functions prepare.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from dreambooth import lora, seeds
from dreambooth.caches import CachedTextEncoder, CachedVAE, fill_prompts
from dreambooth.config import TrainConfig
from dreambooth.data import DreamBoothData
from dreambooth.encoding import identifier_token_ids
from dreambooth.errors import UserError
from dreambooth.models import Components, default_device
from dreambooth.tracking import accelerator_options, check_trackers

LORA_STREAM = 5  # seeds.mix stream of the LoRA adapters' initial weights
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD has the first only
OFFLOAD_DEVICE = "cpu"  # where encoders whose every answer is cached wait (tests use "meta" to prove they do)


def make_accelerator(config: TrainConfig):
    """The Accelerator of one run: devices, processes, mixed precision, gradient accumulation, trackers."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if config.mixed_precision == "fp16" and default_device().type == "cpu":
        raise UserError("--mixed-precision fp16 needs a GPU; on a CPU use bf16 or no")
    check_trackers(config.report_to)
    # accelerate keeps one process-wide state that refuses a second Accelerator with another mixed precision;
    # a sweep, the demo or a test trains several runs in one process, so the previous run's state is dropped
    # (the distributed part, PartialState, is kept).
    AcceleratorState._reset_state()
    try:
        return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                           mixed_precision=config.mixed_precision, **accelerator_options(config))
    except ValueError as error:
        raise UserError(f"--mixed-precision {config.mixed_precision}: {error}") from error


def prepare_models(components: Components, config: TrainConfig, accelerator) -> dict[str, torch.nn.Module]:
    """Freeze the VAE (and text encoders unless trained), cast frozen weights to the compute dtype; with LoRA,
    freeze the trained models too and give them adapters. Return the trained models by name."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    encoders = [name for name in TEXT_ENCODERS if getattr(components, name) is not None]
    trained = {name: getattr(components, name) for name in ["unet"] + (encoders if config.train_text_encoder else [])}
    frozen = [components.vae] + [getattr(components, name) for name in encoders if name not in trained]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        module.to(accelerator.device)
        if weight_dtype != torch.float32:
            # Trained weights stay fp32 (autocast computes in half); frozen ones are simply stored in half.
            module.to(dtype=weight_dtype)
    for index, (name, module) in enumerate(trained.items()):
        if config.uses_lora:
            add_lora(module, name, config, seeds.mix(config.seed, LORA_STREAM, index), weight_dtype)
        else:
            module.requires_grad_(True)
        module.train()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(module)
    use_fused_attention(components.unet)
    if accelerator.device.type == "cuda":
        # Tensor cores read convolutions in channels-last (NHWC) without transposing them first (NVIDIA's advice);
        # the CPU showed no steady gain, so it keeps the default layout.
        components.unet.to(memory_format=torch.channels_last)
    if config.compile:
        # In place: the module, its state_dict keys and accelerate's unwrap_model stay as they are; the first
        # step compiles (minutes), the later ones run the compiled graph.
        components.unet.compile()
    return trained


def use_fused_attention(unet: torch.nn.Module) -> None:
    """Every attention layer on torch's scaled_dot_product_attention (flash or memory-efficient kernels on a
    GPU, never the whole tokens x tokens matrix in memory). diffusers picks it by default; a model saved or
    set up with its plain processor is switched over here."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if any(type(processor) is AttnProcessor for processor in unet.attn_processors.values()):
        unet.set_attn_processor(AttnProcessor2_0())


def allow_tf32(device: torch.device) -> bool:
    """On Ampere and newer GPUs, fp32 matrix products on tensor cores (TF32: a 10-bit mantissa, fp32
    accumulation), several times faster for what trains in fp32; convolutions already allow it by default."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    return True


def add_lora(module: torch.nn.Module, name: str, config: TrainConfig, seed: int, weight_dtype: torch.dtype) -> None:
    """Freeze `module` (stored in the compute dtype) and add fp32 adapters; with
    --token-embedding-learning-rate the token-embedding table learns as well (only the identifier's rows)."""
    if weight_dtype != torch.float32:
        module.to(dtype=weight_dtype)
    part = "unet" if name == "unet" else "text_encoder"
    lora.add_adapters(module, part, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                      seed)
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # adapters learn in fp32 under mixed precision
    if part == "text_encoder" and config.token_embedding_learning_rate:
        table = module.get_input_embeddings().weight
        table.data = table.data.float()
        table.requires_grad_(True)


def cached_encoders(components: Components, config: TrainConfig) -> Components:
    """The models the step computes with: the VAE and the frozen text encoders behind caches (unless
    --no-cache), everything else as it is. Validation and saving keep using `components` itself."""
    if not config.cache:
        return components
    replaced: dict[str, Any] = {"vae": CachedVAE(components.vae, folder=config.latent_cache_dir)}
    if not config.train_text_encoder:
        replaced.update({name: CachedTextEncoder(getattr(components, name)) for name in TEXT_ENCODERS
                         if getattr(components, name) is not None})
    return dataclasses.replace(components, **replaced)


def fill_caches(step_models: Components, data: DreamBoothData, accelerator) -> list[CachedVAE | CachedTextEncoder]:
    """Encode every image and prompt the run will see before step 1, where they are all known up front, and
    move those encoders off the device (OFFLOAD_DEVICE) until something needs them again (a validation restores
    them; a cache miss would too). Return the caches whose encoders left."""
    filled: list[CachedVAE | CachedTextEncoder] = []
    if isinstance(step_models.vae, CachedVAE) and (images := data.every_image()) is not None:
        # Encoded up front, one at a time: the steps then never wait for the VAE.
        step_models.vae.fill(tqdm(images, desc="encoding images", unit="img", total=data.num_images,
                                  disable=not accelerator.is_local_main_process))
        filled.append(step_models.vae)
    encoders = [getattr(step_models, name) for name in TEXT_ENCODERS
                if isinstance(getattr(step_models, name), CachedTextEncoder)]
    if encoders:
        fill_prompts(step_models, data.every_prompt(), accelerator.device)
        filled += encoders
    for cache in filled:
        cache.offload(OFFLOAD_DEVICE)
    return filled


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute activations in the backward pass instead of storing them (diffusers and transformers name
    the switch differently)."""
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
        module.activation_checkpointing_enable()
    else:  # older transformers
        module.gradient_checkpointing_enable()


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def parameter_groups(components: Components, config: TrainConfig) -> list[dict[str, Any]]:
    """One optimizer group per trained model, each with its own learning rate; with
    --token-embedding-learning-rate, each text encoder's identifier embeddings get a group of their own."""
    groups = [{"params": trainable(components.unet), "lr": config.learning_rate}]
    if not config.train_text_encoder:
        return groups
    text_encoder_rate = config.text_encoder_learning_rate or config.learning_rate
    for name in TEXT_ENCODERS:
        encoder = getattr(components, name)
        if encoder is None:
            continue
        if config.token_embedding_learning_rate is None:
            groups.append({"params": trainable(encoder), "lr": text_encoder_rate})
            continue
        embeddings = encoder.get_input_embeddings().weight
        groups.append({"params": [p for p in trainable(encoder) if p is not embeddings], "lr": text_encoder_rate})
        # Only the identifier's rows learn (textual inversion's idea): moving "a", "photo" or "cat" at this
        # rate would move every prompt that uses them. No weight decay, so the other rows stay exactly as
        # they are: their gradient is zeroed, and AdamW with a zero gradient and no decay does not move a row.
        learns = torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
        learns[identifier_rows(components, name, config)] = 1.0
        embeddings.register_hook(lambda grad, learns=learns: grad * learns)
        groups.append({"params": [embeddings], "lr": config.token_embedding_learning_rate, "weight_decay": 0.0})
    return groups


def identifier_rows(components: Components, encoder_name: str, config: TrainConfig) -> list[int]:
    """The embedding rows of the word that names the subject, in the tokenizer of `encoder_name`."""
    tokenizer = components.tokenizer_2 if encoder_name == "text_encoder_2" else components.tokenizer
    return identifier_token_ids(tokenizer, config.instance_prompt, config.class_prompt, config.identifier)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, num_processes: int):
    """diffusers' schedule by name. accelerate steps a prepared schedule once per process at every optimizer
    step, so its warm-up and length are counted in process-steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * num_processes,
                         num_training_steps=config.max_train_steps * num_processes)
