"""Load the generator: the only place that calls from_pretrained / from_single_file for it.

A MODEL is a hub id, a diffusers folder, a single checkpoint file or a finished RUN folder. Its family (SD 1.x / 2.x
or SDXL, from dreambooth.families) is decided once, on resolving it: training and sampling ask `components.family`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dreambooth import lora
from dreambooth.aliases import model_alias_folder
from dreambooth.errors import UserError
from dreambooth.families import (Family, check_config_family, folder_family, hub_family, pipeline_class_for,
                                 single_file_family)
from dreambooth.weight_files import (PICKLE_REFUSAL, PICKLE_SUFFIXES, check_pickled_components, check_variant,
                                     only_pickled_weights)

SourceKind = Literal["folder", "single_file", "hub"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives and which family it is, decided before any weights are read."""

    kind: SourceKind
    location: str
    family: Family
    requested: str  # what the user typed, for messages and records
    model_config: str | None = None  # for a single file: the diffusers folder or hub id describing it
    lora: str | None = None  # a LoRA folder applied over the model at `location`
    allow_pickle: bool = False  # --allow-pickle: pickled weights may load (they can run code)
    revision: str | None = None  # --revision: a hub model's branch, tag or commit
    variant: str | None = None  # --variant: the weight files to load, e.g. fp16 (*.fp16.safetensors)

    def base_record(self) -> dict[str, Any]:
        """How to find this model again from another folder or process (a LoRA folder's base_model.json)."""
        location = self.requested
        if model_alias_folder(self.requested) is None and self.kind != "hub":
            location = str(Path(self.location).resolve())
        pinned = {key: value for key, value in (("revision", self.revision), ("variant", self.variant)) if value}
        return {"model": location, "model_config": self.model_config, "family": self.family, **pinned}

    def pretrained_kwargs(self) -> dict[str, Any]:
        """What from_pretrained needs besides the location to read the weights meant."""
        return {"revision": self.revision, "variant": self.variant}


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training touches, loaded in fp32."""

    source: ModelSource
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # a DDPMScheduler with the model's betas and prediction type
    pipeline_class: type
    tokenizer_2: Any = None  # SDXL only
    text_encoder_2: torch.nn.Module | None = None  # SDXL only

    @property
    def family(self) -> Family:
        return self.source.family

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def resolve_model(model: str, allow_pickle: bool = False, model_config: str | None = None, *,
                  revision: str | None = None, variant: str | None = None) -> ModelSource:
    """Decide what kind of MODEL the user named, or explain in one line why it is not one.

    A registered alias (`dreambooth.aliases`, e.g. `miniworld`) names a pipeline folder and comes first. A LoRA
    run (or LoRA folder) resolves to its base model with `lora` set, at the revision and variant its base_model.json
    records unless others are given. `revision` is for hub ids only; `variant` for hub ids and folders.
    """
    alias_folder = model_alias_folder(model)
    if alias_folder is not None:
        return _folder_source(alias_folder, model, allow_pickle, revision, variant)
    path = Path(model).expanduser()
    for folder in (path, path / "lora"):
        if folder.is_dir() and lora.is_lora_folder(folder):
            return _lora_source(model, folder, allow_pickle, revision, variant)
    if (path / lora.LORA_WEIGHTS).is_file():
        raise UserError(f"--model {model}: a LoRA without {lora.BASE_MODEL}, so which model it adapts is unknown; "
                        f"write {lora.BASE_MODEL} beside it, e.g. {{\"model\": \"<base model>\"}}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(
                f"--model {model}: {suffix} checkpoints are pickled and loading one can run arbitrary code; "
                "convert it to .safetensors, or pass --allow-pickle if you trust the file"
            )
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise UserError(f"--model {model}: a single-file model must be .safetensors (or .ckpt with --allow-pickle)")
        if revision or variant:
            flag = f"--revision {revision}" if revision else f"--variant {variant}"
            raise UserError(f"{flag}: {model} is a single checkpoint file, which has no revisions or variants; "
                            "they apply to a hub id or a diffusers folder")
        family = single_file_family(path)
        if model_config:
            check_config_family(model_config, family, model)
        return ModelSource("single_file", str(path), family, model, model_config=model_config,
                           allow_pickle=allow_pickle)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _folder_source(path, model, allow_pickle, revision, variant)
        if (path / "pipeline" / "model_index.json").is_file():  # a finished RUN folder
            return _folder_source(path / "pipeline", model, allow_pickle, revision, variant)
        raise UserError(
            f"--model {model}: this folder is not a diffusers pipeline (no model_index.json) "
            "nor a finished run (no pipeline/model_index.json)"
        )
    if HUB_ID.match(model) and not model.startswith((".", "~")):
        source = ModelSource("hub", model, "sd", model, allow_pickle=allow_pickle, revision=revision, variant=variant)
        try:
            family = hub_family(model, revision)
        except UserError:
            raise
        except Exception as error:  # the hub client raises many types; all mean "could not get it"
            raise UserError(_load_failure(source, error)) from error
        return dataclasses.replace(source, family=family)
    raise UserError(f"--model {model}: no such file or folder, and not a hub id of the form owner/name")


def _folder_source(folder: Path, model: str, allow_pickle: bool, revision: str | None = None,
                   variant: str | None = None) -> ModelSource:
    """A diffusers pipeline folder, refused now (not after minutes of data loading) if it loads from a pickle or
    lacks the --variant. The safety checker (training and class images never load it) and the VAE (--vae may
    replace it) are left to load_pipeline, which knows."""
    if revision:  # from_pretrained ignores it for a folder: the weights would not be the ones asked for
        raise UserError(f"--revision {revision}: {model} is a local folder, which has no revisions; "
                        "revisions are for a hub id (owner/name)")
    source = ModelSource("folder", str(folder), folder_family(folder), model, allow_pickle=allow_pickle,
                         variant=variant)
    check_variant(folder, model, variant, skip=("safety_checker", "vae"))
    check_pickled(source, skip=("safety_checker", "vae"))
    return source


def check_pickled(source: ModelSource, skip=()) -> None:
    """Without --allow-pickle, refuse a pipeline folder in which a component to load (all but `skip`) has only
    pickled weights: from_pretrained would otherwise load them, and unpickling can run code from the file."""
    if not source.allow_pickle and source.kind == "folder":
        check_pickled_components(Path(source.location), source.requested, skip)


def _lora_source(model: str, folder: Path, allow_pickle: bool, revision: str | None,
                 variant: str | None) -> ModelSource:
    """A LoRA folder's base model, with the folder to apply over it."""
    try:
        base = lora.read_base_model(folder)
        source = resolve_model(base["model"], allow_pickle, base.get("model_config"),
                               revision=revision or base.get("revision"), variant=variant or base.get("variant"))
    except UserError as error:
        raise UserError(f"--model {model}: its base model cannot be loaded ({error})") from error
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"--model {model}: {folder / lora.BASE_MODEL} is unreadable ({error})") from error
    return dataclasses.replace(source, requested=model, lora=str(folder))


def load_pipeline(
    model: str | ModelSource,
    *,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    lora_scale: float = 1.0,
    vae: str | None = None,
    **component_overrides: Any,
):
    """Load a whole pipeline (for sampling or saving), optionally with some components replaced; a LoRA
    source comes with its adapters loaded (unfused) at `lora_scale`."""
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle)
    if allow_pickle and not source.allow_pickle:
        source = dataclasses.replace(source, allow_pickle=True)
    if lora_scale != 1.0 and not source.lora:
        raise UserError(f"--lora-scale {lora_scale}: {source.requested} is not a LoRA run")
    # Components passed in (or None: not wanted) are not read from the folder, so their files do not matter.
    check_pickled(source, skip=component_overrides.keys() | ({"vae"} if vae else set()))
    pipeline_class = pipeline_class_for(source.family)
    kwargs: dict[str, Any] = dict(component_overrides)
    if vae:
        # Components passed in are not cast by from_pretrained: the VAE is loaded in the pipeline's dtype.
        kwargs["vae"] = load_vae(vae, source, torch_dtype or torch.float32)
    if torch_dtype is not None:
        kwargs[_dtype_keyword()] = torch_dtype
    try:
        if source.kind == "single_file":
            if source.model_config:
                kwargs.update(config=source.model_config)
            pipeline = pipeline_class.from_single_file(source.location, **kwargs)
        else:
            pipeline = pipeline_class.from_pretrained(source.location, use_safetensors=use_safetensors(source),
                                                      **source.pretrained_kwargs(), **kwargs)
        if source.lora:
            lora.apply_lora(pipeline, Path(source.lora), lora_scale)
        return pipeline
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        raise UserError(_load_failure(source, error)) from error


def load_vae(vae: str, source: ModelSource, dtype: torch.dtype = torch.float32):
    """A replacement VAE: a folder or hub id holding an AutoencoderKL, or a pipeline with a `vae/` subfolder."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    subfolder = "vae" if (path / "vae" / "config.json").is_file() or (path / "model_index.json").is_file() else None
    pickled = None if source.allow_pickle else only_pickled_weights(path / (subfolder or ""))
    if pickled is not None:
        raise UserError(f"--vae {vae}: {pickled.relative_to(path)} {PICKLE_REFUSAL}")
    try:  # not at the model's --revision / --variant: --vae names another model, whose commits and files differ
        model = AutoencoderKL.from_pretrained(vae, subfolder=subfolder, use_safetensors=use_safetensors(source),
                                              **{_dtype_keyword(): dtype})
    except (OSError, ValueError, EnvironmentError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--vae {vae}: not a VAE this model can use ({first_line})") from error
    native = _native_vae_scaling(source)
    if model.config.scaling_factor != native:
        raise UserError(f"--vae {vae}: made for another model family (its latents are scaled by "
                        f"{model.config.scaling_factor}, this model's by {native})")
    return model


def _component_config(source: ModelSource, subfolder: str) -> dict[str, Any] | None:
    """The config of the model's own UNet or VAE, read without loading weights; None for a single file without
    --model-config (the family's standard layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    where = source.model_config if source.kind == "single_file" else source.location
    if where is None:
        return None
    model_class = UNet2DConditionModel if subfolder == "unet" else AutoencoderKL
    try:
        return model_class.load_config(where, subfolder=subfolder, revision=source.revision)
    except (OSError, ValueError, EnvironmentError) as error:
        raise UserError(_load_failure(source, error)) from error


def _native_vae_scaling(source: ModelSource) -> float:
    """The latent scaling of the model's own VAE."""
    vae = _component_config(source, "vae")
    if vae is None:  # the family's standard VAE
        return 0.13025 if source.family == "sdxl" else 0.18215
    return vae["scaling_factor"]


def native_resolution(source: ModelSource) -> int:
    """The image size the model was trained at: the UNet's latent size times the VAE's downsampling."""
    unet, vae = _component_config(source, "unet"), _component_config(source, "vae")
    if unet is None or vae is None:
        return 1024 if source.family == "sdxl" else 512
    return int(unet["sample_size"]) * vae_scale_factor(vae)


def vae_scale_factor(vae) -> int:
    """How many times the VAE shrinks each side of an image (8 for Stable Diffusion), computed as diffusers'
    pipelines do; `vae` is a loaded VAE or its config."""
    return 2 ** (len(getattr(vae, "config", vae)["block_out_channels"]) - 1)


def source_vae_scale_factor(source: ModelSource) -> int:
    """vae_scale_factor of the model's own VAE, read from its config without loading weights."""
    vae = _component_config(source, "vae")
    return 8 if vae is None else vae_scale_factor(vae)  # 8: every Stable Diffusion VAE


# Latents under 8x8 leave SD's UNet, which halves them three times, nothing to work on at its lowest level.
MIN_LATENT_SIDE = 8


def check_latent_size(vae_scale_factor: int, sizes: dict[str, int | None]) -> None:
    """Refuse an image size (flag -> pixels; None: the model's own) whose latents would be under 8 on a side."""
    for flag, pixels in sizes.items():
        if pixels is None or pixels // vae_scale_factor >= MIN_LATENT_SIDE:
            continue
        side = pixels // vae_scale_factor
        shape = {"--height": f"{side} high", "--width": f"{side} wide"}.get(flag, f"{side}x{side}")
        raise UserError(f"{flag} {pixels}: the latents would be {shape} (the VAE shrinks images {vae_scale_factor}x); "
                        f"use at least {MIN_LATENT_SIDE * vae_scale_factor}")


def load_components(model: str | ModelSource, *, allow_pickle: bool = False, vae: str | None = None) -> Components:
    """Load the trainable and frozen parts for training, in fp32, without the safety checker."""
    from diffusers import DDPMScheduler

    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle)
    check_trainable(source)
    pipeline = load_pipeline(source, vae=vae, **without_safety_checker(source))
    return Components(
        source=source,
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder,
        vae=pipeline.vae,
        unet=pipeline.unet,
        # Training always adds noise the DDPM way; the sampler the model ships with is irrelevant here.
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        pipeline_class=type(pipeline),
        tokenizer_2=getattr(pipeline, "tokenizer_2", None),
        text_encoder_2=getattr(pipeline, "text_encoder_2", None),
    )


def check_trainable(source: ModelSource) -> None:
    """A LoRA run is adapters over a base model, not a model to fine-tune further."""
    if source.lora:
        raise UserError(f"--model {source.requested}: is a LoRA run; train on its base model "
                        f"({lora.read_base_model(Path(source.lora))['model']}) or export it merged first")


def without_safety_checker(source: ModelSource) -> dict[str, Any]:
    """Loading arguments that skip SD 1.x/2.x's safety checker (about 1.2 GB) where the images are ours,
    not a user's."""
    return {"safety_checker": None, "requires_safety_checker": False} if source.family == "sd" else {}


def assemble_pipeline(components: Components, scheduler: Any = None):
    """A pipeline over the in-memory components (for validation images during training)."""
    parts: dict[str, Any] = dict(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler or components.noise_scheduler,
    )
    if components.family == "sdxl":
        parts.update(text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return components.pipeline_class(**parts)


def default_device() -> torch.device:
    """The best device this machine has."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """Half precision where it is fast and supported, full precision on the CPU."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def _dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (and warns on the old name); older releases know only
    `torch_dtype`."""
    import diffusers.utils.deprecation_utils as deprecation

    return "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"


def use_safetensors(source: ModelSource) -> bool | None:
    """from_pretrained's `use_safetensors`: True (a missing .safetensors is an error, never a silent fall back to
    a pickle) unless --allow-pickle, where None prefers .safetensors and loads a pickle where there is none."""
    return None if source.allow_pickle else True


def _load_failure(source: ModelSource, error: BaseException) -> str:
    from huggingface_hub import constants

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # use_safetensors=True (see use_safetensors) fails this way where a component has only pickled weights.
    if not source.allow_pickle and ("necessary `safetensors` weights" in first_line
                                    or "no file named" in first_line and ".safetensors" in first_line):
        return (f"--model {source.requested}: not all of it comes as .safetensors ({first_line}); pickled weights "
                "can run code when loaded: pass --allow-pickle to load them (only if you trust its source)")
    if source.variant and f"variant={source.variant}" in first_line:
        return f"--variant {source.variant}: {source.requested} has no {source.variant} weights ({first_line})"
    if source.kind == "hub":
        model = f"--model {source.requested}" + (f" --revision {source.revision}" if source.revision else "")
        if constants.HF_HUB_OFFLINE:
            return (f"{model}: not in the local cache and the hub is offline (HF_HUB_OFFLINE is set); download it "
                    "first or pass a local folder")
        return f"{model}: could not load it from the hub ({first_line}); check the id, revision and your network"
    if source.kind == "single_file":
        if source.model_config:
            return (f"--model {source.requested}: could not load it with --model-config {source.model_config} "
                    f"({first_line})")
        return (
            f"--model {source.requested}: could not load this checkpoint ({first_line}); single-file loading needs "
            "the base model's configs: pass --model-config with a diffusers folder (or hub id) of the same family"
        )
    return f"--model {source.requested}: could not load the pipeline ({first_line})"
