"""The conversions behind `dreambooth export`: a trained model as the files other tools load.

- single-file: one `.safetensors` in the original Stable Diffusion key layout (AUTOMATIC1111, ComfyUI, and
  diffusers' own `from_single_file`), from a diffusers pipeline;
- kohya: a LoRA saved by diffusers (`pytorch_lora_weights.safetensors`) in the kohya / A1111 LoRA layout;
- diffusers: a pipeline folder, in the chosen precision;
- merge: a LoRA folded into its base model's weights, for the two full-model formats.

Every file or folder is written atomically (dreambooth.files), so an interrupted export leaves nothing half
written under the final name.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from dreambooth import lora
from dreambooth.config import ExportConfig
from dreambooth.errors import UserError
from dreambooth.files import atomic_dir, atomic_file, move_aside
from dreambooth.original_layout import clip_to_original, openclip_to_original, unet_to_original, vae_to_original

Tensor = torch.Tensor
Family = Literal["sd", "sdxl"]  # as dreambooth.models tells them apart: SD 1.x and 2.x share one layout of parts

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# kohya's `ss_base_model_version`, which tools read to tell the families apart.
SD_V1, SD_V2, SDXL = "sd_v1", "sd_v2", "sdxl_base_v1-0"


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a torch dtype or one of ExportConfig's names ("fp16", "bf16", "fp32")."""
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


def is_openclip(text_encoder: Any) -> bool:
    """Whether an HF CLIP text encoder holds an OpenCLIP model (SD 2.x's, SDXL's second).

    Hidden sizes cannot tell (tiny test models, and SDXL's first encoder is as wide as SD 2.x's is not), but
    the activation can: OpenAI's CLIP (SD 1.x) uses quick_gelu, OpenCLIP exact GELU, and the diffusers
    conversions of SD 2.x and SDXL set `hidden_act="gelu"` for it.
    """
    return text_encoder.config.hidden_act == "gelu"


def base_model_version(model: Any) -> str:
    """kohya's name for the family of a pipeline (or anything with its `text_encoder` / `text_encoder_2`):
    "sd_v1", "sd_v2" or "sdxl_base_v1-0"."""
    if getattr(model, "text_encoder_2", None) is not None:
        return SDXL
    return SD_V2 if is_openclip(model.text_encoder) else SD_V1


def family_of(version: str) -> Family:
    return "sdxl" if version.startswith("sdxl") else "sd"


# --- single-file ---------------------------------------------------------------------------------------------


def _prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: tensor for key, tensor in state.items()}


def original_state_dict(pipeline: Any) -> dict[str, Tensor]:
    """A StableDiffusionPipeline's or StableDiffusionXLPipeline's weights in the original key layout.

    SD 1.x / 2.x (CompVis LDM): `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and
    `cond_stage_model.transformer.text_model.` (SD 1.x, HF CLIP) or `cond_stage_model.model.` (SD 2.x, OpenCLIP).
    SDXL (Stability SGM): the same UNet and VAE prefixes, `conditioner.embedders.0.transformer.text_model.` for
    the first text encoder and `conditioner.embedders.1.model.` (OpenCLIP, with its projection) for the second.

    The tensors are the models' own where no reshape is needed (no copy): cast them before changing any.
    A LoRA still attached as adapters is not part of the result: merge it first (merge_lora).
    """
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(getattr(pipeline, name, None), "peft_config", None):
            raise ValueError(f"{name} has LoRA adapters attached: merge them (merge_lora) before exporting")
    if getattr(pipeline, "text_encoder", None) is None:
        raise ValueError("a pipeline without a first text encoder (an SDXL refiner?) has no original layout here")
    state = _prefixed("model.diffusion_model.", unet_to_original(pipeline.unet.state_dict()))
    state |= _prefixed("first_stage_model.", vae_to_original(pipeline.vae.state_dict()))
    text_encoder, text_encoder_2 = pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)
    if text_encoder_2 is not None:
        state |= _prefixed("conditioner.embedders.0.transformer.", clip_to_original(text_encoder.state_dict()))
        state |= _prefixed("conditioner.embedders.1.model.", openclip_to_original(text_encoder_2.state_dict()))
    elif is_openclip(text_encoder):
        # SD 2.x's diffusers text encoder has 23 of OpenCLIP's 24 layers (SD 2 reads the penultimate one). The
        # original code builds all 24 from its own config, loads what the file has, and never runs the 24th,
        # so 23 written layers give the same text features there.
        state |= _prefixed("cond_stage_model.model.", openclip_to_original(text_encoder.state_dict()))
    else:
        state |= _prefixed("cond_stage_model.transformer.", clip_to_original(text_encoder.state_dict()))
    return state


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating-point tensors in `dtype`, every tensor detached, contiguous and on the CPU (safetensors' terms)."""
    return {key: (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
            for key, tensor in state.items()}


def write_single_file(pipeline: Any, path: Path, dtype: torch.dtype | str = torch.float16) -> None:
    """Write `pipeline` as one original-layout `.safetensors` (see original_state_dict) in `dtype`.

    diffusers reads it back with `StableDiffusionPipeline.from_single_file(path, config=FOLDER)`
    (`StableDiffusionXLPipeline` for SDXL), FOLDER being the base model's diffusers folder or hub id: the
    file holds weights only, not the scheduler, tokenizer or model configs.
    """
    from safetensors.torch import save_file

    tensors = _cast(original_state_dict(pipeline), torch_dtype(dtype))
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


# --- diffusers folder and merge --------------------------------------------------------------------------------


def write_diffusers_folder(pipeline: Any, folder: Path, dtype: torch.dtype | str = torch.float16) -> None:
    """Save `pipeline` as a diffusers folder with safetensors weights in `dtype`, replacing `folder` in one rename.

    The pipeline itself is cast to `dtype` (in place, as DiffusionPipeline.to does): reload it to go on in fp32.
    """
    pipeline.to(dtype=torch_dtype(dtype))
    with atomic_dir(Path(folder)) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)


def merge_lora(pipeline: Any, scale: float = 1.0) -> None:
    """Fold the LoRA loaded on `pipeline` (load_lora_weights, adapter weight 1) into its weights at `scale`
    and drop the adapters: afterwards it is a plain model that exports like any other.

    The scale applies on top of any adapter weight already set (set_adapters): load at weight 1 and give the
    strength here, or the two multiply.
    """
    pipeline.fuse_lora(lora_scale=scale)
    # After fuse_lora, unloading removes the adapter layers but keeps the fused weights.
    pipeline.unload_lora_weights()


# --- kohya LoRA --------------------------------------------------------------------------------------------------

# diffusers' component name -> kohya's prefix, per family. kohya trains SD 1.x / 2.x text encoders as HF CLIP
# models too, so an SD 2.x LoRA keeps the HF layer names (lora_te_text_model_...), not OpenCLIP's.
KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


# UNet layers outside the down / mid / up blocks under their original names: every loader knows those (A1111
# has no rule for diffusers' time_embedding / add_embedding, and diffusers' kohya loader mangles the latter).
KOHYA_UNET_NAMES = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                    "conv_in": "input_blocks.0.0", "conv_out": "out.2"}


def lora_modules(lora_state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The (A, B) matrices of each adapted module, by module name ("unet.down_blocks.1...to_q"), from a LoRA
    state dict in diffusers' saved layout (`lora.down` / `lora_linear_layer.down`) or peft's (`lora_A`)."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    # diffusers saves the UNet as `lora.down` and text encoders as `lora_linear_layer.down`; bring both to
    # peft's lora_A / lora_B the way its loader does, per component.
    state: dict[str, Tensor] = {}
    for component in sorted({key.partition(".")[0] for key in lora_state}):
        part = {key: tensor for key, tensor in lora_state.items() if key.partition(".")[0] == component}
        if component == "unet":
            state |= convert_unet_state_dict_to_peft(part)
        else:
            state |= convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    modules = {}
    for key, down in state.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ValueError(f"LoRA: {key} is neither a LoRA down nor up matrix (DoRA and biases are not exported)")
            continue
        module = key.split(".lora_A.")[0]
        modules[module] = (down, state[key.replace(".lora_A.", ".lora_B.")])
    return modules


def adapter_configs(lora_file: Path) -> dict[str, dict[str, Any]]:
    """The LoraConfig of each component ("unet", "text_encoder", ...) as diffusers' save_lora_weights stores
    them in the file's metadata (`lora_adapter_metadata`: one JSON object, keys "<component>.<field>")."""
    import json

    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def kohya_alpha(module: str, rank: int, config: Mapping[str, Any]) -> float:
    """The alpha to store for `module` in the kohya layout, where every tool scales a LoRA by alpha / rank.

    peft scales by lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA), with per-module overrides in
    alpha_pattern; the alpha written is the one that gives peft's scale under kohya's rule.
    """
    from peft.utils.other import get_pattern_key

    if "lora_alpha" not in config:
        raise ValueError(f"LoRA: no lora_alpha known for {module}; the file's metadata lacks it: pass configs")
    name = module.partition(".")[2]
    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), name), config["lora_alpha"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scale * rank


def kohya_state_dict(lora_state: Mapping[str, Tensor], configs: Mapping[str, Mapping[str, Any]],
                     family: Family) -> dict[str, Tensor]:
    """A diffusers-saved LoRA in the kohya / A1111 layout.

    Keys: `lora_unet_<diffusers module path with _>.lora_down.weight`, `.lora_up.weight` and `.alpha` (a
    scalar); text encoders as `lora_te_text_model_...` (SDXL: `lora_te1_` / `lora_te2_`). `configs` holds each
    component's LoraConfig fields (at least `lora_alpha`; see adapter_configs), keyed "unet", "text_encoder",
    "text_encoder_2".

    diffusers' convert_state_dict_to_kohya is not used: it writes alpha = rank (wrong whenever lora_alpha is
    not the rank), names an SD 1.x text encoder `lora_te1_`, and under transformers 5 misses the
    `text_model` level that CLIPTextModel's state dict no longer has but every kohya loader expects.
    """
    prefixes = KOHYA_PREFIXES[family]
    out: dict[str, Tensor] = {}
    for module, (down, up) in lora_modules(lora_state).items():
        component, _, path = module.partition(".")
        if component not in prefixes:
            raise ValueError(f"LoRA: {module} belongs to no {family} component kohya knows ({', '.join(prefixes)})")
        path = path.removeprefix("text_model.")
        if component == "unet":
            path = KOHYA_UNET_NAMES.get(path, path)
        elif not path.startswith("text_projection"):  # the projection sits beside text_model, not in it
            path = "text_model." + path
        name = prefixes[component] + path.replace(".", "_")
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        # Kept in fp32 whatever the weights' dtype: an fp16 alpha would round a non-integer alpha / rank.
        out[f"{name}.alpha"] = torch.tensor(kohya_alpha(module, rank, configs.get(component, {})))
    return out


def write_kohya_lora(lora_file: Path, path: Path, dtype: torch.dtype | str = torch.float16,
                     metadata: Mapping[str, Any] | None = None, *, base_version: str,
                     configs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write the LoRA of `lora_file` (diffusers' pytorch_lora_weights.safetensors) as one kohya-layout
    `.safetensors` at `path`, for the base model family `base_version` (see base_model_version).

    `metadata` adds training settings as kohya's `ss_*` strings (e.g. ss_learning_rate, ss_max_train_steps);
    values are written as strings. `configs` overrides the LoraConfigs read from the file's metadata (for a
    file saved without them).
    """
    from safetensors.torch import load_file, save_file

    configs = dict(configs) if configs is not None else adapter_configs(Path(lora_file))
    lora_state = load_file(str(lora_file))
    tensors = kohya_state_dict(lora_state, configs, family_of(base_version))
    alphas = {key: tensor for key, tensor in tensors.items() if key.endswith(".alpha")}
    tensors = _cast({key: t for key, t in tensors.items() if key not in alphas}, torch_dtype(dtype)) | alphas
    # kohya's network_dim / network_alpha are one number each: the UNet's (the text encoders', without one).
    main = "unet" if "unet" in configs else next(iter(configs), None)
    ranks = [t.shape[0] for key, t in tensors.items() if key.endswith(".lora_down.weight")]
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(configs.get(main, {}).get("r", max(ranks, default=0))),
        "ss_network_alpha": str(configs.get(main, {}).get("lora_alpha", "")),
        "ss_base_model_version": base_version,
        "ss_v2": str(base_version == SD_V2),
        "format": "pt",
    }
    header |= {key: str(value) for key, value in (metadata or {}).items()}
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=header)


# --- the export command ------------------------------------------------------------------------------------------


def export(config: ExportConfig) -> Path:
    """Write `config.run` in `config.format` to `config.output`; refuse (one line, nothing written) what the
    format cannot hold."""
    from dreambooth.models import resolve_model

    source = resolve_model(config.run, config.allow_pickle)
    output = Path(config.output)
    check_export(config, source, output)
    if output.exists():  # --overwrite (check_export refused otherwise): the old one is kept, moved aside
        moved = move_aside(output.parent, [output.name])
        print(f"--overwrite: moved the previous {output.name} to {moved}")
    if config.format == "kohya":
        lora_folder = Path(source.lora)
        if (lora_folder / lora.EMBEDDINGS).is_file():
            print(f"warning: {lora_folder / lora.EMBEDDINGS} (the identifier's trained embedding rows) has no place in "
                  "a kohya LoRA and is left out; --format single-file --merge-lora keeps it", file=sys.stderr)
        write_kohya_lora(lora_folder / lora.LORA_WEIGHTS, output, config.dtype, kohya_metadata(Path(config.run)),
                         base_version=kohya_base_version(source))
        return output
    pipeline = load_for_export(source, config)
    if config.format == "single-file":
        write_single_file(pipeline, output, config.dtype)
    else:
        write_diffusers_folder(pipeline, output, config.dtype)
    return output


def check_export(config: ExportConfig, source: Any, output: Path) -> None:
    """Every way an export request cannot be met, as one line before anything is read or written."""
    run = config.run
    if config.format == "kohya" and not source.lora:
        raise UserError(f"export --format kohya: {run} is a full fine-tune, not a LoRA run; "
                        "use --format single-file (or diffusers)")
    if config.merge_lora and not source.lora:
        raise UserError(f"--merge-lora: {run} is a full fine-tune; it has no LoRA to merge")
    if config.format == "kohya" and config.merge_lora:
        raise UserError("--merge-lora makes a whole model; a kohya file holds the adapters alone: "
                        "use --format single-file or diffusers with --merge-lora")
    if source.lora and config.format != "kohya" and not config.merge_lora:
        raise UserError(f"export --format {config.format}: {run} is a LoRA run; add --merge-lora to write it merged "
                        "into its base model, or use --format kohya for the adapters alone")
    if config.lora_scale != 1.0 and not config.merge_lora:
        raise UserError("--lora-scale sets the strength merged in: it needs --merge-lora")
    if config.format in ("single-file", "kohya") and output.suffix != ".safetensors":
        raise UserError(f"--output {output}: a {config.format} export is one .safetensors file; "
                        f"name it e.g. {output.with_suffix('.safetensors').name}")
    if output.exists() and not config.overwrite:
        raise UserError(f"--output {output}: exists; pass --overwrite to replace it (the old one is moved aside)")


def load_for_export(source: Any, config: ExportConfig):
    """The run's pipeline in fp32 on the CPU; a LoRA run with its adapters (and embedding rows) merged."""
    from dreambooth.models import load_pipeline, without_safety_checker

    # A LoRA loads at the merged strength (its adapters' weight and its embedding rows), then folds in at 1.
    pipeline = load_pipeline(source, torch_dtype=torch.float32, lora_scale=config.lora_scale,
                             **without_safety_checker(source))
    if source.lora:
        merge_lora(pipeline, 1.0)
    return pipeline


def kohya_base_version(source: Any) -> str:
    """kohya's family name of a LoRA run's base model, from its text encoder's config (no weights read)."""
    if source.family == "sdxl":
        return SDXL
    from transformers import CLIPTextConfig

    where = source.model_config if source.kind == "single_file" else source.location
    if where is None:  # a single file without configs: SD 1.x unless its text encoder is OpenCLIP's
        from safetensors import safe_open

        with safe_open(source.location, framework="pt") as handle:
            return SD_V2 if any(key.startswith("cond_stage_model.model.") for key in handle.keys()) else SD_V1
    hidden_act = CLIPTextConfig.from_pretrained(where, subfolder="text_encoder").hidden_act
    return SD_V2 if hidden_act == "gelu" else SD_V1


def kohya_metadata(run: Path) -> dict[str, str]:
    """The run's training settings as kohya's `ss_*` metadata (what A1111's and ComfyUI's LoRA info shows)."""
    import yaml

    from dreambooth import __version__

    record_file = run / "config.yaml"
    record = yaml.safe_load(record_file.read_text()) if record_file.is_file() else {}
    names = {"ss_learning_rate": "learning_rate", "ss_unet_lr": "learning_rate",
             "ss_text_encoder_lr": "text_encoder_learning_rate", "ss_max_train_steps": "max_train_steps",
             "ss_resolution": "resolution", "ss_seed": "seed", "ss_train_batch_size": "train_batch_size",
             "ss_gradient_accumulation_steps": "gradient_accumulation_steps", "ss_lr_scheduler": "lr_scheduler",
             "ss_mixed_precision": "mixed_precision", "ss_network_dropout": "lora_dropout",
             "ss_prior_loss_weight": "prior_loss_weight", "ss_min_snr_gamma": "snr_gamma",
             "ss_noise_offset": "offset_noise"}
    metadata = {name: str(record[key]) for name, key in names.items() if record.get(key) is not None}
    metadata["ss_training_comment"] = f"dreambooth {__version__}: {record.get('instance_prompt', '')}".strip()
    return metadata
