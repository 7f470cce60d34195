"""Setting a run up: which device fast paths and attention kernels a run gets (the parts that train, their
dtypes and groups are checked through real training in test_train_settings.py)."""

from __future__ import annotations

import pytest
import torch

from dreambooth.prepare import allow_tf32, make_accelerator, prepare_models

from test_train import make_config


@pytest.mark.parametrize("compile_unet", [False, True])
def test_compile_compiles_the_unet_in_place_and_attention_is_fused(compile_unet, tiny_model, instance_dir, tmp_path):
    """--compile marks the UNet's forward for torch.compile (compiling happens at its first call: minutes on a
    CPU, so it is not run here) without renaming its weights; attention always runs on torch's fused SDPA."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from dreambooth.models import load_components, resolve_model

    config = make_config(tiny_model, instance_dir, tmp_path / "run", compile=compile_unet)
    components = load_components(resolve_model(config.model))
    components.unet.set_attn_processor(AttnProcessor())  # the plain processor, as an old setup might leave it
    keys = list(components.unet.state_dict())
    prepare_models(components, config, make_accelerator(config))
    assert (components.unet._compiled_call_impl is not None) == compile_unet
    assert list(components.unet.state_dict()) == keys
    assert {type(p) for p in components.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_tf32_is_left_alone_off_a_gpu():
    assert not allow_tf32(torch.device("cpu")) and torch.get_float32_matmul_precision() == "highest"
