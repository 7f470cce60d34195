"""Tiny real models, saved as diffusers folders, so every test loads through the path a user's model takes.

The components are real diffusers / transformers classes with the smallest configs that still exercise
cross-attention, the VAE's downsampling and the CLIP tokenizer; weights come from a fixed seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# No test may touch the network: make any hub lookup fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Two threads at most (CI has two cores); fewer when OMP_NUM_THREADS says so, as tools/mutate.py does to run
# beside other work: spinning OpenMP threads on shared cores slow each other down many times over.
torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)))

TINY_RESOLUTION = 32  # pixels; the tiny VAE halves it once, so latents are 16x16
TINY_EMBEDDING_SIDE = 32  # input size of the tiny CLIP and DINO-shaped ViT used for metrics


def write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer whose vocabulary is single characters plus a few whole words.

    Unknown words still tokenize (into characters), like a rare identifier does in real CLIP.
    """
    from dreambooth.miniworld.components import byte_alphabet

    chars = byte_alphabet()
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges = ["c a", "ca t</w>", "p h", "o t", "ph ot", "phot o</w>", "o f</w>"]
    for merge in merges:
        vocab_tokens.append(merge.replace(" ", ""))
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# Two levels, one ResNet each, cross-attention at the lower one: SD's block structure in miniature.
TINY_UNET_LAYOUT = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_RESOLUTION // 2,
                        in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def tiny_vae(**config):
    """A VAE that halves the image once (latents of 16x16 at 32 px), with SD's default config otherwise."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                         norm_num_groups=16, sample_size=TINY_RESOLUTION, **config)


def build_tiny_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny Stable Diffusion pipeline (diffusers format) under `folder`."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = tiny_vae()
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    tokenizer_dir = folder / "_tokenizer_src"
    write_tiny_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = folder / "pipeline"
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sdxl_pipeline(folder: Path) -> Path:
    """Build and save a tiny SDXL pipeline: two text encoders (the second with a projection, giving the pooled
    embedding), a UNet with SDXL's "text_time" added conditioning, and SDXL's block layout in miniature."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size numbers + the pooled text embedding
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=16,
    )
    vae = tiny_vae(scaling_factor=0.13025)  # SDXL's latent scale
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    tokenizer_dir = folder / "_tokenizer_src"
    write_tiny_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77)
    text_config = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
                       num_attention_heads=4, num_hidden_layers=3, layer_norm_eps=1e-5, vocab_size=len(tokenizer),
                       max_position_embeddings=77, projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    # SDXL's second encoder is OpenCLIP bigG: GELU, and a projection that gives the pooled embedding.
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, hidden_act="gelu"))
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )
    out = folder / "pipeline"
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD pipeline folder (like SD 1.x)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), "epsilon")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    """A tiny v-prediction SD pipeline folder (like SD 2.x at 768 px)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v"), "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline folder."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


def write_images(folder: Path, count: int, size: int = 40, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Write `count` random-but-structured RGB PNGs (a coloured square on a background)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        pixels[y : y + size // 2, x : x + size // 2] = rng.integers(0, 255, 3)
        path = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    """Three small instance photos."""
    folder = tmp_path / "instance"
    write_images(folder, 3, seed=1)
    return folder


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel with its tokenizer and image processor, saved like a hub folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    write_tiny_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"),
                              model_max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=TINY_EMBEDDING_SIDE, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    crop_size = {"height": TINY_EMBEDDING_SIDE, "width": TINY_EMBEDDING_SIDE}
    CLIPImageProcessor(size={"shortest_edge": TINY_EMBEDDING_SIDE}, crop_size=crop_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dino_folder(tmp_path_factory) -> Path:
    """A tiny random ViT without pooler (the shape of facebook/dino-vits16) and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(1)
    config = ViTConfig(image_size=TINY_EMBEDDING_SIDE, patch_size=8, hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": TINY_EMBEDDING_SIDE, "width": TINY_EMBEDDING_SIDE},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def require_shipped_weights() -> None:
    """Skip a test that needs the shipped weights when they are missing, except in CI (the environment
    variable CI is set), where missing weights are a failure rather than a silently skipped test."""
    from dreambooth.miniworld import weights_available

    if weights_available():
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("the shipped miniworld weights are missing (src/dreambooth/miniworld/weights/); CI must test them")
    pytest.skip("pretrained miniworld weights not shipped yet")


@pytest.fixture
def shipped_weights() -> None:
    require_shipped_weights()
