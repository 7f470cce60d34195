"""Model resolution and loading, through the same paths a user's model takes."""

import json

import pytest
import torch

from dreambooth.errors import UserError
from dreambooth.models import load_components, resolve_model


def test_diffusers_folder_loads_as_components(tiny_model):
    components = load_components(str(tiny_model))
    assert components.family == "sd"
    assert components.prediction_type == "epsilon"
    assert components.unet.dtype == torch.float32
    assert type(components.noise_scheduler).__name__ == "DDPMScheduler"


def test_v_prediction_is_read_from_the_scheduler(tiny_vpred_model):
    assert load_components(str(tiny_vpred_model)).prediction_type == "v_prediction"


def test_run_folder_resolves_to_its_pipeline(tiny_model):
    # tiny_model is <tmp>/pipeline, so its parent looks like a finished RUN folder.
    source = resolve_model(str(tiny_model.parent))
    assert source.kind == "folder" and source.location == str(tiny_model)


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        resolve_model(str(tmp_path))


def test_pickled_checkpoint_needs_allow_pickle(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a checkpoint")
    with pytest.raises(UserError, match="--allow-pickle"):
        resolve_model(str(checkpoint))
    assert resolve_model(str(checkpoint), allow_pickle=True).kind == "single_file"


def test_damaged_safetensors_file(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable .safetensors"):
        resolve_model(str(broken))


def test_hub_id_while_offline_says_so():
    with pytest.raises(UserError, match="offline"):
        resolve_model("nobody-here/no-such-model")


def test_missing_path():
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_model("./does/not/exist")


def test_miniworld_names_the_shipped_model():
    from dreambooth.miniworld import base_model_path, weights_available

    if weights_available():
        assert resolve_model("miniworld").location == str(base_model_path())
    else:
        with pytest.raises(UserError, match=r"^--model miniworld \(the miniature Stable Diffusion.*not installed"):
            resolve_model("miniworld")


@pytest.mark.parametrize("class_name", ["StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionInpaintPipeline"])
def test_families_we_cannot_train_are_named_with_those_we_can(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(UserError, match=f"a {class_name} pipeline is not a model family dreambooth can train; "
                                        "it trains Stable Diffusion 1.x, 2.x and SDXL"):
        resolve_model(str(tmp_path))


def test_sdxl_folder_is_told_apart(tiny_sdxl_model):
    assert resolve_model(str(tiny_sdxl_model)).family == "sdxl"
    assert load_components(str(tiny_sdxl_model)).text_encoder_2 is not None


def test_a_swapped_in_vae_takes_the_pipelines_dtype(tiny_model):
    from dreambooth.models import load_pipeline

    pipeline = load_pipeline(str(tiny_model), vae=str(tiny_model / "vae"), torch_dtype=torch.bfloat16)
    assert pipeline.vae.dtype == pipeline.unet.dtype == torch.bfloat16
