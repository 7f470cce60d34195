"""LoRA adapters through peft: which layers get them, adding them, saving them in diffusers' format, and
applying a saved LoRA to a pipeline.

A LoRA folder (`RUN/lora/`, or `RUN/pipelines/step-NNNNNN/` of a LoRA run) holds:
- `pytorch_lora_weights.safetensors`: diffusers' format, so `pipe.load_lora_weights(folder)` loads it;
- `embeddings.safetensors` (optional): the identifier's token-embedding rows when they were trained
  (`--token-embedding-learning-rate`); a plain LoRA file has no place for them, so our loaders apply them;
- `base_model.json`: the model the adapters were trained on, so `--model RUN` needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "embeddings.safetensors"
BASE_MODEL = "base_model.json"
ADAPTER_NAME = "dreambooth"

# Module names peft matches (by suffix) for each --lora-targets choice.
UNET_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}
TEXT_ENCODER_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention+ff": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def is_lora_folder(folder: Path) -> bool:
    return (folder / LORA_WEIGHTS).is_file() and (folder / BASE_MODEL).is_file()


def target_modules(module: torch.nn.Module, targets: str, part: str) -> list[str]:
    """The layer names that get adapters in `module` (part: "unet" or "text_encoder")."""
    if targets == "all-linear":
        # peft's own "all-linear" shortcut knows transformers models only; the UNet needs the names spelled out.
        return [name for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)]
    table = UNET_TARGETS if part == "unet" else TEXT_ENCODER_TARGETS
    return table[targets]


def add_adapters(module: torch.nn.Module, part: str, rank: int, alpha: float, dropout: float, targets: str,
                 seed: int) -> None:
    """Give `module` fresh trainable LoRA adapters, its own weights frozen (A random from `seed`, B zero, so the
    model starts exactly where the base model is)."""
    from peft import LoraConfig

    # No requires_grad_(False) here: injecting adapters marks every other weight frozen (peft does it).
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True,
                        target_modules=target_modules(module, targets, part))
    # peft draws A from torch's global generator; seed a private copy of it so the run is reproducible
    # without disturbing anybody else's random numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.add_adapter(config)


def adapter_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """The adapter's LoraConfig as a dict (rank, alpha, targets), or None if `module` has no adapters."""
    config = getattr(module, "peft_config", {}).get("default")
    return config.to_dict() if config is not None else None


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's key layout (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`).

    Not converted to diffusers' older `lora.down` names: that conversion renames attention layers only, and
    diffusers' loader decides by the first key whether a file needs converting, so an all-linear file (first
    key a ResNet layer) silently lost its attention adapters. peft's names load the same for every target.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module)


def save_lora(folder: Path, pipeline_class: type, modules: dict[str, torch.nn.Module], base_model: dict[str, Any],
              embeddings: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write a LoRA folder: the adapters of `modules` (unet, text_encoder, text_encoder_2 where they have
    adapters) and the trained embedding rows if any, in `dtype`, and the base model's record."""
    from safetensors.torch import save_file

    layers: dict[str, Any] = {}
    for part, module in modules.items():
        config = adapter_config(module)
        if config is None:
            continue
        layers[f"{part}_lora_layers"] = {key: value.to(dtype) for key, value in lora_state_dict(module).items()}
        layers[f"{part}_lora_adapter_metadata"] = config
    pipeline_class.save_lora_weights(folder, safe_serialization=True, **layers)
    if embeddings is not None:
        save_file({name: tensor.detach().cpu().to(dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
                   for name, tensor in embeddings.items()},
                  str(folder / EMBEDDINGS))
    (folder / BASE_MODEL).write_text(json.dumps(base_model, indent=2) + "\n")


def read_base_model(folder: Path) -> dict[str, Any]:
    return json.loads((folder / BASE_MODEL).read_text())


def trained_embeddings(text_encoder: torch.nn.Module, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The identifier's rows of the token-embedding table, for `embeddings.safetensors` (keys token_ids and
    embeddings; a second text encoder's under token_ids_2 and embeddings_2)."""
    table = text_encoder.get_input_embeddings().weight
    ids = torch.tensor(token_ids, dtype=torch.long)
    return {"token_ids": ids, "embeddings": table.detach()[ids.to(table.device)].float().cpu()}


def apply_lora(pipeline, folder: Path, scale: float = 1.0) -> None:
    """Load a LoRA folder onto `pipeline` (unfused) at `scale`, with its trained embedding rows.

    The rows move from the base rows toward the trained ones by `scale`, like the adapters' weight deltas:
    scale 0 is the base model, 1 the trained one.
    """
    pipeline.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=ADAPTER_NAME)
    pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    if (folder / EMBEDDINGS).is_file():
        from safetensors.torch import load_file

        stored = load_file(str(folder / EMBEDDINGS))
        for suffix, encoder in (("", pipeline.text_encoder), ("_2", getattr(pipeline, "text_encoder_2", None))):
            if f"token_ids{suffix}" in stored:
                _move_rows(encoder, stored[f"token_ids{suffix}"], stored[f"embeddings{suffix}"], scale)


def _move_rows(text_encoder: torch.nn.Module, token_ids: torch.Tensor, trained: torch.Tensor, scale: float) -> None:
    table = text_encoder.get_input_embeddings().weight
    ids = token_ids.to(table.device)
    with torch.no_grad():
        base = table[ids].float()
        table[ids] = (base + scale * (trained.to(base) - base)).to(table.dtype)
