"""The miniature Stable Diffusion's components and the world-CLIP: configs, builders and the tokenizer.

Every component is the real diffusers / transformers class with a small config, so the code that
fine-tunes Stable Diffusion runs on these unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
GENERATOR_MAX_LENGTH = 24  # "a photo of miru cat by the sea" is ~12 tokens with BOS/EOS
CLIP_MAX_LENGTH = 32  # world-CLIP captions also name markings


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on the world's vocabulary until each world word is one token.

    The base symbols stay single characters, so a word the world never uses ("miru") still
    tokenizes, into several rare sub-word pieces — exactly the situation of a real DreamBooth identifier.
    """
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for seq in seqs.values():
            pairs.update(zip(seq, seq[1:]))
        if not pairs:
            return merges
        # Most frequent pair first; ties broken alphabetically so the vocabulary is reproducible.
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(pair)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out


def build_tokenizer(folder: Path, model_max_length: int = GENERATOR_MAX_LENGTH) -> CLIPTokenizer:
    """Write vocab.json + merges.txt for the world's words and load them as a CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    merges = learn_merges(world.vocabulary())
    tokens = alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=EOS,
                        model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok


def vae_config() -> dict:
    """64x64x3 <-> 16x16x4: three blocks, two downsamplings."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,
    )


def text_encoder_config(vocab_size: int, eos_id: int, bos_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=GENERATOR_MAX_LENGTH, projection_dim=96,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def unet_config() -> dict:
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=96, attention_head_dim=8, norm_num_groups=16,
    )


def scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule (scaled-linear betas, epsilon prediction)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)


def world_clip_config(vocab_size: int, eos_id: int, bos_id: int) -> CLIPConfig:
    text = dict(vocab_size=vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    vision = dict(image_size=64, patch_size=8, num_channels=3, hidden_size=128, intermediate_size=384,
                  num_hidden_layers=4, num_attention_heads=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=96)


def build_models(tokenizer: CLIPTokenizer) -> dict:
    """Freshly initialised vae, text_encoder, unet and world_clip."""
    eos, bos = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(BOS)
    n = len(tokenizer)
    return {
        "vae": AutoencoderKL(**vae_config()),
        "text_encoder": CLIPTextModel(text_encoder_config(n, eos, bos)),
        "unet": UNet2DConditionModel(**unet_config()),
        "world_clip": CLIPModel(world_clip_config(n, eos, bos)),
    }


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
