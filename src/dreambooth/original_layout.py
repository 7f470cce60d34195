"""Key layout of the original Stable Diffusion checkpoints (CompVis LDM for SD 1.x / 2.x, Stability's SGM for
SDXL), written from diffusers / transformers state dicts.

AUTOMATIC1111 and ComfyUI build their models from the original code and load one `.safetensors` whose keys
follow that code's module names. These functions rename a diffusers component's state dict into those names.
They read the block structure (how many blocks, resnets per block, samplers, attention layers) from the
state dict itself rather than from a fixed list of keys, so any size of model converts, tiny test models too.
Every key must find its place: a key nothing maps is an error, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

Tensor = torch.Tensor

# Inside a UNet resnet the original code names its layers by their position in nn.Sequential blocks.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP's transformer block, per HF CLIP layer name (q/k/v are fused separately).
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _count(keys: list[str], pattern: str) -> int:
    """How many distinct indices fill the `(\\d+)` of `pattern` at the start of some key."""
    regex = re.compile(pattern + r"\.")
    return len({match.group(1) for key in keys if (match := regex.match(key))})


def _has(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _rename(state: Mapping[str, Tensor], table: dict[str, tuple[str, dict[str, str]]], what: str,
            reshape: Callable[[str, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Rename each key by the entry of `table` its module path starts with: (new prefix, renames of the
    module's own children). Prefixes end with "." and none contains another, so the shortest match is it."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        for cut in range(1, len(parts)):
            prefix = ".".join(parts[:cut]) + "."
            if prefix in table:
                new_prefix, children = table[prefix]
                rest = key[len(prefix):]
                for old, new in children.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                new_key = new_prefix + rest
                out[new_key] = reshape(new_key, tensor) if reshape else tensor
                break
        else:
            raise ValueError(f"{what}: no place in the original layout for {key}")
    return out


def unet_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict in the LDM / SGM UNet layout (without `model.diffusion_model.`).

    The original UNet is three flat lists: `input_blocks` (conv_in, then per down block each resnet with its
    attention, then the downsampler as a block of its own), `middle_block` (resnet, attention, resnet) and
    `output_blocks` (per up block each resnet with its attention, the upsampler riding in the last one).
    """
    keys = list(state)
    table: dict[str, tuple[str, dict[str, str]]] = {
        "conv_in.": ("input_blocks.0.0.", {}),
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        # SDXL's size-and-pooled-text embedding (and the upscaler's class embedding) are the original label_emb.
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
        "class_embedding.linear_1.": ("label_emb.0.0.", {}),
        "class_embedding.linear_2.": ("label_emb.0.2.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
    }
    index = 1
    for block in range(_count(keys, r"down_blocks\.(\d+)")):
        for layer in range(_count(keys, rf"down_blocks\.{block}\.resnets\.(\d+)")):
            table[f"down_blocks.{block}.resnets.{layer}."] = (f"input_blocks.{index}.0.", UNET_RESNET)
            table[f"down_blocks.{block}.attentions.{layer}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if _has(keys, f"down_blocks.{block}.downsamplers.0."):
            table[f"down_blocks.{block}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1
    # The middle block alternates resnet, attention, resnet: resnet j at 2j, attention j at 2j + 1.
    for layer in range(_count(keys, r"mid_block\.resnets\.(\d+)")):
        table[f"mid_block.resnets.{layer}."] = (f"middle_block.{2 * layer}.", UNET_RESNET)
        table[f"mid_block.attentions.{layer}."] = (f"middle_block.{2 * layer + 1}.", {})
    index = 0
    for block in range(_count(keys, r"up_blocks\.(\d+)")):
        layers = _count(keys, rf"up_blocks\.{block}\.resnets\.(\d+)")
        for layer in range(layers):
            table[f"up_blocks.{block}.resnets.{layer}."] = (f"output_blocks.{index}.0.", UNET_RESNET)
            attention = _has(keys, f"up_blocks.{block}.attentions.{layer}.")
            table[f"up_blocks.{block}.attentions.{layer}."] = (f"output_blocks.{index}.1.", {})
            if layer == layers - 1:
                # The upsampler sits after the resnet and the attention, if the block has one.
                table[f"up_blocks.{block}.upsamplers.0.conv."] = (f"output_blocks.{index}.{1 + attention}.conv.", {})
            index += 1
    return _rename(state, table, "UNet")


def vae_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM autoencoder layout (without `first_stage_model.`)."""
    keys = list(state)
    table: dict[str, tuple[str, dict[str, str]]] = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        table[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        for layer in range(_count(keys, rf"{part}\.mid_block\.resnets\.(\d+)")):
            table[f"{part}.mid_block.resnets.{layer}."] = (f"{part}.mid.block_{layer + 1}.", VAE_RESNET)
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
    table["quant_conv."] = ("quant_conv.", {})
    table["post_quant_conv."] = ("post_quant_conv.", {})
    for block in range(_count(keys, r"encoder\.down_blocks\.(\d+)")):
        table[f"encoder.down_blocks.{block}.downsamplers.0.conv."] = (f"encoder.down.{block}.downsample.conv.", {})
        for layer in range(_count(keys, rf"encoder\.down_blocks\.{block}\.resnets\.(\d+)")):
            target = f"encoder.down.{block}.block.{layer}."
            table[f"encoder.down_blocks.{block}.resnets.{layer}."] = (target, VAE_RESNET)
    # The original decoder numbers its levels from the lowest resolution up: diffusers' up block 0 is the last.
    blocks = _count(keys, r"decoder\.up_blocks\.(\d+)")
    for block in range(blocks):
        level = blocks - 1 - block
        table[f"decoder.up_blocks.{block}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", {})
        for layer in range(_count(keys, rf"decoder\.up_blocks\.{block}\.resnets\.(\d+)")):
            table[f"decoder.up_blocks.{block}.resnets.{layer}."] = (f"decoder.up.{level}.block.{layer}.", VAE_RESNET)

    def attention_as_conv(key: str, tensor: Tensor) -> Tensor:
        # The original mid-block attention projects with 1x1 convolutions; diffusers uses linear layers.
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            return tensor.reshape(*tensor.shape, 1, 1)
        return tensor

    return _rename(state, table, "VAE", attention_as_conv)


def _text_model_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a CLIP text model without the `text_model.` level: transformers 5 dropped it from
    CLIPTextModel's state dict, CLIPTextModelWithProjection (and older transformers) still have it."""
    return {key.removeprefix("text_model."): tensor for key, tensor in state.items()}


def clip_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An OpenAI CLIP text encoder (SD 1.x, SDXL's first) in the HF layout the original code wraps, which
    always has the `text_model.` level (without the `cond_stage_model.transformer.` prefix)."""
    out = {}
    for key, tensor in _text_model_keys(state).items():
        if key == "embeddings.position_ids":  # a buffer, not a weight; the loaders make their own
            continue
        out[key if key.startswith("text_projection.") else f"text_model.{key}"] = tensor
    return out


def openclip_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An OpenCLIP text encoder (SD 2.x, SDXL's second) held as an HF CLIP model, in OpenCLIP's own layout
    (without the `cond_stage_model.model.` / `conditioner.embedders.1.model.` prefix)."""
    state = _text_model_keys(state)
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    state.pop("embeddings.position_ids", None)
    if "text_projection.weight" in state:
        # OpenCLIP multiplies `x @ text_projection`, a linear layer `x @ W.T`: the stored matrix is W.T.
        out["text_projection"] = state.pop("text_projection.weight").T
    for layer in range(_count(list(state), r"encoder\.layers\.(\d+)")):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        # nn.MultiheadAttention keeps q, k and v in one matrix, stacked in that order.
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{source}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        for old, new in OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{target}{new}.{kind}"] = state.pop(f"{source}{old}.{kind}")
    if state:
        raise ValueError(f"OpenCLIP text encoder: no place in the original layout for {', '.join(sorted(state))}")
    return out
