"""Telling SD 1.x / 2.x from SDXL (and refusing other families) from a model's files, before any weights load."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.errors import UserError
from dreambooth.families import check_config_family, folder_family, hub_family, single_file_family


@pytest.mark.parametrize("class_name", ["StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionInpaintPipeline"])
def test_families_we_cannot_train_are_named_with_those_we_can(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(UserError, match=f"a {class_name} pipeline is not a model family dreambooth can train; "
                                        "it trains Stable Diffusion 1.x, 2.x and SDXL"):
        folder_family(tmp_path)


def test_pipeline_folders_are_told_apart(tiny_model, tiny_sdxl_model):
    assert (folder_family(tiny_model), folder_family(tiny_sdxl_model)) == ("sd", "sdxl")


def test_a_single_file_is_sdxl_when_it_holds_a_second_text_encoder(tmp_path):
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file(weights, tmp_path / "sd.safetensors")
    save_file({**weights, "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, tmp_path / "xl.safetensors")
    assert single_file_family(tmp_path / "sd.safetensors") == "sd"
    assert single_file_family(tmp_path / "xl.safetensors") == "sdxl"


def test_a_pickled_single_file_is_not_opened(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a checkpoint")
    assert single_file_family(checkpoint) == "sd"


def test_damaged_safetensors_file(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable .safetensors"):
        single_file_family(broken)


def test_a_config_of_another_family_is_refused(tiny_model, tiny_sdxl_model, tmp_path):
    check_config_family(str(tiny_model), "sd", "model.safetensors")
    refusal = (f"--model-config {tiny_sdxl_model}: describes an SDXL pipeline but model.safetensors is an "
               "SD 1.x / 2.x checkpoint; give the matching config")
    with pytest.raises(UserError, match=f"^{re.escape(refusal)}$"):
        check_config_family(str(tiny_sdxl_model), "sd", "model.safetensors")
    with pytest.raises(UserError, match=r"^--model-config .*: not a diffusers pipeline folder or hub id"):
        check_config_family(str(tmp_path), "sd", "model.safetensors")


def test_the_hub_clients_errors_are_left_to_the_caller_to_word():
    # conftest sets HF_HUB_OFFLINE: models.resolve_model turns this into "not in the local cache ... offline".
    with pytest.raises(Exception) as raised:
        hub_family("nobody-here/no-such-model")
    assert not isinstance(raised.value, UserError)
