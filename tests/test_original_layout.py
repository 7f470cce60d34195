"""The key-layout mapping's own rules; that the layout is right is proven by loading (tests/test_export.py)."""

from __future__ import annotations

import pytest
import torch

from dreambooth.original_layout import openclip_to_original, unet_to_original, vae_to_original


def test_a_key_with_no_place_in_the_original_layout_is_an_error_not_dropped():
    weight = torch.zeros(1)
    with pytest.raises(ValueError, match="UNet: no place.*encoder_hid_proj"):
        unet_to_original({"conv_in.weight": weight, "encoder_hid_proj.weight": weight})
    with pytest.raises(ValueError, match="VAE: no place.*spatial_norm"):
        vae_to_original({"decoder.spatial_norm.weight": weight})


def test_openclip_stacks_q_k_v_in_that_order_and_transposes_the_projection():
    state = {"embeddings.token_embedding.weight": torch.zeros(3, 2),
             "embeddings.position_embedding.weight": torch.zeros(4, 2),
             "final_layer_norm.weight": torch.ones(2), "final_layer_norm.bias": torch.zeros(2),
             "text_projection.weight": torch.arange(6.0).reshape(3, 2)}
    for index, name in enumerate(("q", "k", "v")):
        state[f"text_model.encoder.layers.0.self_attn.{name}_proj.weight"] = torch.full((2, 2), float(index))
        state[f"text_model.encoder.layers.0.self_attn.{name}_proj.bias"] = torch.full((2,), float(index))
    for name in ("self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
        state[f"text_model.encoder.layers.0.{name}.weight"] = state[f"text_model.encoder.layers.0.{name}.bias"] = \
            torch.zeros(2)
    out = openclip_to_original(state)
    assert out["transformer.resblocks.0.attn.in_proj_weight"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert out["transformer.resblocks.0.attn.in_proj_bias"].tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(out["text_projection"], state["text_projection.weight"].T)
    state["encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra"):
        openclip_to_original(state)
