"""Setting a run up: compiling and attention kernels, the caches' prefill and offloading, latents kept on disk
(the parts that train, their dtypes and groups are checked through real training in test_train_settings.py)."""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth.prepare import allow_tf32, make_accelerator, prepare_models
from dreambooth.train import train

from conftest import write_images
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


def losses(paths) -> list[float]:
    return [json.loads(line)["loss"] for line in paths.metrics.read_text().splitlines()]


def test_after_the_prefill_the_steps_never_touch_the_vae_or_the_frozen_text_encoder(tiny_model, instance_dir,
                                                                                  tmp_path, monkeypatch):
    """With every crop and prompt known up front, the encoders are sent away; sent to the meta device (weights
    dropped), training still runs and computes what the uncached run computes."""
    import dreambooth.prepare as prepare
    import dreambooth.train as training

    class_dir = tmp_path / "cats"
    write_images(class_dir, 2, seed=9, prefix="cat")
    options = dict(max_train_steps=3, center_crop=True, class_dir=str(class_dir), class_prompt="a photo of a cat",
                   num_class_images=2)
    plain = train(make_config(tiny_model, instance_dir, tmp_path / "plain", cache=False, **options))
    monkeypatch.setattr(prepare, "OFFLOAD_DEVICE", "meta")
    sent_away = []
    fill_caches = prepare.fill_caches

    def watched(*args):
        caches = fill_caches(*args)
        sent_away.extend((type(cache._model()).__name__, cache.offloaded) for cache in caches)
        return caches

    monkeypatch.setattr(training, "fill_caches", watched)
    cached = train(make_config(tiny_model, instance_dir, tmp_path / "cached", **options))
    assert sent_away == [("AutoencoderKL", True), ("CLIPTextModel", True)]
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-5)


def test_latents_kept_on_disk_serve_the_next_run_without_encoding(tiny_model, instance_dir, tmp_path):
    from torch.nn.modules.module import register_module_forward_hook
    from diffusers.models.autoencoders.vae import Encoder

    encoded = []
    handle = register_module_forward_hook(lambda module, args, output: encoded.append(1)
                                          if isinstance(module, Encoder) else None)
    try:
        options = dict(max_train_steps=2, center_crop=True, latent_cache_dir=str(tmp_path / "latents"))
        first = train(make_config(tiny_model, instance_dir, tmp_path / "first", **options))
        count = len(encoded)
        second = train(make_config(tiny_model, instance_dir, tmp_path / "second", **options))
    finally:
        handle.remove()
    assert count == 3 and len(encoded) == count  # 3 photos encoded once, by the first run only
    assert len(list((tmp_path / "latents").glob("*/*.safetensors"))) == 3
    assert losses(second) == losses(first)
