"""Model resolution and loading, through the same paths a user's model takes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_vae
from dreambooth.errors import UserError
from dreambooth.models import (ModelSource, check_latent_size, load_components, load_pipeline, load_vae, resolve_model,
                               source_vae_scale_factor, use_safetensors, vae_scale_factor)

MINIWORLD_VAE = Path(__file__).parents[1] / "src/dreambooth/miniworld/weights/pipeline/vae/config.json"


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


def test_sdxl_folder_is_told_apart(tiny_sdxl_model):
    assert resolve_model(str(tiny_sdxl_model)).family == "sdxl"
    assert load_components(str(tiny_sdxl_model)).text_encoder_2 is not None


def test_a_swapped_in_vae_takes_the_pipelines_dtype(tiny_model):
    from dreambooth.models import load_pipeline

    pipeline = load_pipeline(str(tiny_model), vae=str(tiny_model / "vae"), torch_dtype=torch.bfloat16)
    assert pipeline.vae.dtype == pipeline.unet.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def pickled_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny pipeline saved the old way: every component's weights pickled (.bin), no .safetensors."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("pickled") / "pipeline"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.save_pretrained(folder, safe_serialization=False)
    # transformers 5 writes .safetensors whatever it is asked; older releases wrote this file.
    (folder / "text_encoder" / "model.safetensors").unlink(missing_ok=True)
    torch.save(pipeline.text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    assert not list(folder.rglob("*.safetensors")) and (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    return folder


def test_a_model_folder_of_pickled_weights_needs_allow_pickle(pickled_model, tiny_model):
    refusal = (r"^--model {}: (text_encoder/pytorch_model|unet/diffusion_pytorch_model|vae/diffusion_pytorch_model)"
               r"\.bin holds pickled weights .*pass --allow-pickle to load it \(only if you trust its source\)$")
    with pytest.raises(UserError, match=refusal.format(pickled_model)):
        resolve_model(str(pickled_model))
    with pytest.raises(UserError, match=refusal.format(pickled_model.parent)):  # as a RUN folder
        load_components(str(pickled_model.parent))
    components = load_components(resolve_model(str(pickled_model), allow_pickle=True))
    expected = load_components(str(tiny_model))
    assert torch.equal(components.unet.conv_in.weight, expected.unet.conv_in.weight)
    embeddings = components.text_encoder.get_input_embeddings().weight
    assert torch.equal(embeddings, expected.text_encoder.get_input_embeddings().weight)


def test_one_pickled_component_is_named_even_beside_safe_ones(tiny_model, tmp_path):
    from diffusers import AutoencoderKL

    folder = shutil.copytree(tiny_model, tmp_path / "pipeline")
    shutil.rmtree(folder / "vae")
    AutoencoderKL.from_pretrained(tiny_model / "vae").save_pretrained(folder / "vae", safe_serialization=False)
    with pytest.raises(UserError, match=r"vae/diffusion_pytorch_model\.bin holds pickled weights"):
        load_pipeline(str(folder))
    with pytest.raises(UserError, match=r"^--vae .*: diffusion_pytorch_model\.bin holds pickled weights"):
        load_vae(str(folder / "vae"), resolve_model(str(tiny_model)))
    # A component passed in is not read from the folder, so its pickle is never opened.
    assert load_pipeline(str(folder), vae=str(tiny_model / "vae")).vae is not None


def test_loading_never_falls_back_to_a_pickle_unless_allowed(pickled_model, tiny_model):
    assert use_safetensors(resolve_model(str(tiny_model))) is True  # a missing .safetensors is an error
    assert use_safetensors(resolve_model(str(tiny_model), allow_pickle=True)) is None  # prefer, then fall back
    # A hub model's files are not looked at before loading: from_pretrained itself must refuse the pickles.
    hub = ModelSource("hub", str(pickled_model), "sd", "someone/old-model")
    with pytest.raises(UserError, match=r"^--model someone/old-model: not all of it comes as \.safetensors .*"
                                        r"pass --allow-pickle to load them \(only if you trust its source\)$"):
        load_pipeline(hub)
    assert load_pipeline(hub, allow_pickle=True).unet is not None


def test_the_vae_scale_factor_is_read_from_a_loaded_vae_or_a_config(tiny_model):
    assert vae_scale_factor(tiny_vae()) == 2
    assert vae_scale_factor(json.loads(MINIWORLD_VAE.read_text())) == 4
    assert source_vae_scale_factor(resolve_model(str(tiny_model))) == 2


@pytest.mark.parametrize("factor, sizes, message", [
    (4, {"--resolution": 16}, r"^--resolution 16: the latents would be 4x4 \(the VAE shrinks images 4x\); "
                              r"use at least 32$"),
    (8, {"--resolution": 8}, r"^--resolution 8: the latents would be 1x1 .*8x\); use at least 64$"),
    (2, {"--height": 32, "--width": 8}, r"^--width 8: the latents would be 4 wide \(.* 2x\); use at least 16$"),
    (8, {"--height": 56, "--width": None}, r"^--height 56: the latents would be 7 high"),
])
def test_a_size_whose_latents_are_under_8x8_is_refused(factor, sizes, message):
    with pytest.raises(UserError, match=message):
        check_latent_size(factor, sizes)


def test_sizes_with_latents_of_8x8_or_more_pass():
    check_latent_size(2, {"--resolution": 16})
    check_latent_size(4, {"--resolution": 32, "--height": None})
    check_latent_size(8, {"--height": 64, "--width": 512})
