"""The models the speed benchmarks train, with random weights (speed and memory do not depend on the values):
an SD 1.5-shaped model small enough for a CPU (`build_sd_shaped`), and any pipeline's architecture from its
configs alone (`build_random_pipeline`: the full-size SD 1.5 and SDXL of the GPU table, or their miniature
stand-ins, `write_reference`)."""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

SD_SHAPED_RESOLUTION = 256
# Heads of 32 channels. SD 1.5 has 8 heads per level (of 40 to 160 channels); eight heads of 4 to 16 channels
# would make the CPU's attention kernel, not the model's shape, the bottleneck (2.4x slower steps).
ATTENTION_HEADS = (1, 2, 4, 4)
# The VAE's widths: SD 1.5's (128, 256, 512, 512) over 8, 2.7, 5.3, 5.3, so that its encode takes a third of an
# uncached step (measured: the table's "VAE share"), as SD 1.5's encode is 32% of a 512-px step's FLOPs. At a
# uniform eighth (16, 32, 64, 64) the tiny VAE runs so much more efficiently on a CPU than the narrow UNet
# that its share fell to 27-30%.
SD_SHAPED_VAE_CHANNELS = (16, 48, 96, 96)

# --gpu-models-on-cpu: the references' configs shrunk to the test suite's tiny models (SD's two-level layout at
# widths 32 and 64; SDXL's added "text_time" conditioning and two text encoders), everything else (the CLIP
# vocabulary and token ids, the block classes) as the reference has it.
STAND_IN_RESOLUTION = 32
_TINY_LEVELS = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=16, sample_size=16,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
_TINY_VAE = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=16, sample_size=32,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
STAND_IN_CHANGES = {
    "sd15": {"unet": dict(_TINY_LEVELS, cross_attention_dim=32, attention_head_dim=8), "vae": _TINY_VAE,
             "text_encoder": _TINY_CLIP},
    "sdxl": {"unet": dict(_TINY_LEVELS, cross_attention_dim=64, attention_head_dim=[2, 4],
                          transformer_layers_per_block=[1, 2], addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 32),  # six size numbers + pooled text
             "vae": _TINY_VAE, "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_CLIP},
}
NOT_TRAINED = ("safety_checker", "feature_extractor", "image_encoder")  # pipeline parts left out (None)


def build_sd_shaped(folder: Path) -> Path:
    """SD 1.5's block structure at a tenth of its width (random weights), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreambooth.miniworld.components import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=ATTENTION_HEADS,
        norm_num_groups=32, sample_size=SD_SHAPED_RESOLUTION // 8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        block_out_channels=SD_SHAPED_VAE_CHANNELS, layers_per_block=2, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=SD_SHAPED_RESOLUTION)
    tokenizer_folder = folder / "_tokenizer"
    tokenizer: CLIPTokenizer = build_tokenizer(tokenizer_folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


def write_reference(folder: Path, name: str, stand_in: bool = False) -> Path:
    """The reference configs of "sd15" or "sdxl" (configs only, no weights, no tokenizer), or with
    `stand_in` their miniature versions (`STAND_IN_CHANGES`)."""
    from dreambooth.meta_models import write_reference_configs

    reference = write_reference_configs(folder, name)
    for part, changes in (STAND_IN_CHANGES[name] if stand_in else {}).items():
        path = reference / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2) + "\n")
    return reference


def random_component(reference: Path, name: str, library: str, class_name: str):
    """One model of the pipeline built from its config alone, with freshly initialised (random) weights: on the
    meta device under `torch.device("meta")`, which takes no memory."""
    import diffusers
    import transformers

    if library == "diffusers":
        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(reference, subfolder=name))
    return getattr(transformers, class_name)(transformers.AutoConfig.from_pretrained(reference, subfolder=name))


def build_random_pipeline(reference: Path, output: Path) -> Path:
    """A diffusers pipeline folder (safetensors) with `reference`'s architecture and random weights (seed 0).

    `reference` is any diffusers folder of which only model_index.json and the models' configs are read (the
    reference configs of `write_reference_configs`, or a real pipeline's folder). Its tokenizers and scheduler
    are used where it has them; otherwise every tokenizer is the miniature world's CLIP tokenizer (a few hundred
    ids, within any CLIP vocabulary) and the scheduler SD's DDPM. The safety checker, feature extractor and
    image encoder are left out. SD 1.5 takes about 4.3 GB of memory and disk, SDXL about 14 (fp32).
    """
    import diffusers
    import torch
    import transformers

    from dreambooth.miniworld.components import build_tokenizer

    reference, output = Path(reference), Path(output)
    index = diffusers.DiffusionPipeline.load_config(reference)
    pipeline_class = getattr(diffusers, index["_class_name"])
    signature = inspect.signature(pipeline_class.__init__).parameters
    torch.manual_seed(0)
    parts = {}
    for name, entry in index.items():
        library, class_name = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if name.startswith("_") or class_name is None or name in NOT_TRAINED or name not in signature:
            continue
        if "Tokenizer" in class_name or "Scheduler" in class_name:
            if (reference / name).is_dir() and any((reference / name).iterdir()):
                loader = getattr(transformers if library == "transformers" else diffusers, class_name)
                parts[name] = loader.from_pretrained(reference, subfolder=name)
            continue
        parts[name] = random_component(reference, name, library, class_name)
    encoders = [module for name, module in parts.items() if name.startswith("text_encoder")]
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        for name, parameter in signature.items():
            if name in parts or name == "self" or parameter.default is not inspect.Parameter.empty:
                continue
            if name.startswith("tokenizer"):
                parts[name] = build_tokenizer(Path(tokenizer_folder) / name, encoders[0].config.max_position_embeddings)
            elif name == "scheduler":
                parts[name] = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      clip_sample=False, steps_offset=1)
            else:
                parts[name] = None  # NOT_TRAINED
        for name in (name for name in parts if name.startswith("tokenizer")):
            if any(len(parts[name]) > encoder.config.vocab_size for encoder in encoders):
                raise ValueError(f"{reference}: the {name}'s {len(parts[name])} ids do not fit a text encoder's "
                                 f"vocabulary ({min(encoder.config.vocab_size for encoder in encoders)})")
        if "requires_safety_checker" in signature:
            parts["requires_safety_checker"] = False
        pipeline_class(**parts).save_pretrained(output, safe_serialization=True)
    return output
