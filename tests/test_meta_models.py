"""Models built from their configs on the meta device: SD 1.5's and SDXL base's reference configs give the
published parameter counts, with no weights read, and LoRA's adapters on them count rank x (in + out) per target.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreambooth.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from dreambooth.meta_models import empty_models, mark_trained, write_reference_configs
from dreambooth.models import native_resolution, resolve_model

# The published parameter counts (diffusers / transformers `sum(p.numel())` of the released weights).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-configs")
    return {name: write_reference_configs(root / name, name) for name in ("sd15", "sdxl")}


def test_reference_configs_have_the_well_known_parameter_counts(reference):
    for name, expected, resolution, family in (("sd15", SD15_PARAMETERS, 512, "sd"),
                                               ("sdxl", SDXL_PARAMETERS, 1024, "sdxl")):
        models = empty_models(str(reference[name]))
        assert {part: sum(p.numel() for p in model.parameters()) for part, model in models.items()} == expected
        assert all(p.device.type == "meta" for model in models.values() for p in model.parameters())
        source = resolve_model(str(reference[name]))
        assert source.family == family and native_resolution(source) == resolution


def lora_parameters_by_shape(module: torch.nn.Module, suffixes: list[str] | None, rank: int) -> int:
    """rank x (in + out) per adapted Linear: the count without peft."""
    return sum(rank * (layer.in_features + layer.out_features) for name, layer in module.named_modules()
               if isinstance(layer, torch.nn.Linear) and (suffixes is None or name.endswith(tuple(suffixes))))


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_lora_counts_are_rank_times_in_plus_out_of_each_target(reference, targets):
    models = empty_models(str(reference["sd15"]))
    expected = sum(lora_parameters_by_shape(models[part], table.get(targets), 16)
                   for part, table in (("unet", UNET_TARGETS), ("text_encoder", TEXT_ENCODER_TARGETS)))
    trained = mark_trained(models, lora_rank=16, lora_alpha=None, lora_targets=targets, train_text_encoder=True,
                           token_embeddings_trained=False)
    assert sum(p.numel() for p in trained) == expected
    if targets == "attention":
        assert expected - 16 * 4 * 2 * 768 * 12 == 3_188_736  # the UNet's share: 4 x 797,184 of rank 4
    assert all(p.device.type == "meta" for p in trained)
