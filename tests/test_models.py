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


# --variant and --revision: a folder saved with diffusers' save_pretrained(variant="fp16"), and an offline hub cache
# (the layout huggingface_hub writes: refs/<name> holds a commit, snapshots/<commit>/ its files) in which the
# branch "v2" differs from "main": from_pretrained and load_config resolve a revision there exactly as after a
# download, so what is tested is which files load, without a network.

@pytest.fixture(scope="module")
def fp16_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny pipeline with its UNet moved (so it is told from the original) saved as the fp16 variant only."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    with torch.no_grad():
        pipeline.unet.conv_in.weight += 1.0
    folder = tmp_path_factory.mktemp("fp16") / "pipeline"
    pipeline.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return folder


@pytest.fixture
def hub_cache(tiny_model, fp16_model, tmp_path, monkeypatch) -> str:
    """A hub cache holding `someone/tiny`: main is tiny_model, the branch v2 the fp16 variant with a moved UNet."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny"
    for ref, folder, commit in (("main", tiny_model, "a" * 40), ("v2", fp16_model, "b" * 40)):
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "someone/tiny"


def test_a_variant_loads_its_files_and_trains_in_fp32(tiny_model, fp16_model):
    components = load_components(resolve_model(str(fp16_model), variant="fp16"))
    assert components.unet.dtype == torch.float32  # diffusers reads the half weights into the fp32 model
    base = load_components(str(tiny_model)).unet.conv_in.weight
    assert torch.equal(components.unet.conv_in.weight, (base + 1.0).half().float())
    assert resolve_model(str(fp16_model.parent), variant="fp16").variant == "fp16"  # as a RUN folder


def test_a_missing_variant_is_one_line(tiny_model, fp16_model):
    with pytest.raises(UserError, match=r"^--variant fp16: .* has no fp16 weights \(no \*\.fp16\.safetensors; it has "
                                        r"only its default weights\); leave --variant out to load its default "
                                        r"weights$"):
        resolve_model(str(tiny_model), variant="fp16")
    with pytest.raises(UserError, match=r"^--variant bf16: .* has no bf16 weights \(.*it has fp16\)"):
        resolve_model(str(fp16_model), variant="bf16")
    # Without --variant, diffusers would look for default files and fail about .safetensors; we say what to pass.
    with pytest.raises(UserError, match=r"^--model .*: (text_encoder|unet)/ holds only fp16 weights; "
                                        r"pass --variant fp16$"):
        resolve_model(str(fp16_model))


def test_revision_is_for_hub_ids_only(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"^--revision v2: .* is a local folder, which has no revisions; "):
        resolve_model(str(tiny_model), revision="v2")
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(UserError, match=r"^--variant fp16: .* is a single checkpoint file, which has no revisions"):
        resolve_model(str(checkpoint), variant="fp16")


def test_a_hub_revision_and_variant_reach_from_pretrained(hub_cache, tiny_model):
    main = load_pipeline(resolve_model(hub_cache))
    pinned_source = resolve_model(hub_cache, revision="v2", variant="fp16")
    assert (pinned_source.revision, pinned_source.variant) == ("v2", "fp16")
    assert source_vae_scale_factor(pinned_source) == 2  # configs are read at the revision too
    pinned = load_pipeline(pinned_source)
    assert torch.equal(pinned.unet.conv_in.weight, (main.unet.conv_in.weight + 1.0).half().float())
    with pytest.raises(UserError, match=r"^--variant fp16: someone/tiny has no fp16 weights \("):
        load_pipeline(resolve_model(hub_cache, variant="fp16"))  # main has no fp16 files
    with pytest.raises(UserError, match=r"^--model someone/tiny --revision v3: not in the local cache and the hub "
                                        r"is offline"):
        resolve_model(hub_cache, revision="v3")


def test_a_lora_remembers_its_base_models_revision_and_variant(tmp_path):
    from dreambooth.lora import BASE_MODEL, LORA_WEIGHTS

    source = ModelSource("hub", "someone/tiny", "sd", "someone/tiny", revision="v2", variant="fp16")
    record = source.base_record()
    assert record == {"model": "someone/tiny", "model_config": None, "family": "sd", "revision": "v2",
                      "variant": "fp16"}
    assert "revision" not in ModelSource("hub", "a/b", "sd", "a/b").base_record()
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / LORA_WEIGHTS).write_bytes(b"")
    (folder / BASE_MODEL).write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"^--model .*lora: its base model cannot be loaded \(--model someone/tiny "
                                        r"--revision v2: not in the local cache"):
        resolve_model(str(folder))  # the recorded revision is the one looked for
