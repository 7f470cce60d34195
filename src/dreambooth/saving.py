"""The trained weights, saved: a whole pipeline in diffusers format, or a LoRA folder, in --save-dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth import lora
from dreambooth.config import TrainConfig
from dreambooth.files import atomic_dir
from dreambooth.models import Components, load_pipeline
from dreambooth.prepare import TEXT_ENCODERS, identifier_rows

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --save-dtype


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
