"""The export conversions, proven by the loaders the files are for, not by key names.

single-file: diffusers' own `from_single_file` reads the written file back into bit-identical components.
kohya: diffusers' kohya loader applies the written LoRA and draws the same images as the diffusers LoRA.
merge: the merged model computes what the unmerged LoRA model computes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.export import (KOHYA_UNET_NAMES, base_model_version, kohya_state_dict, merge_lora, original_state_dict,
                               write_diffusers_folder, write_kohya_lora, write_single_file)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Every alpha differs from its rank, and from the others', so a wrong or swapped alpha changes the outputs.
LORA_SHAPES = {"unet": (4, 8.0), "text_encoder": (4, 2.0), "text_encoder_2": (2, 6.0)}  # rank, alpha
# Measured 0.0 (fp32 files): both loaders build the same adapters with the same scale. An fp16 kohya file
# would differ by about 6e-4 (the weights' rounding), so the image comparisons use fp32 files.
IMAGE_TOLERANCE = 1e-5
MERGE_TOLERANCE = 1e-5  # measured 8e-7 (scale 1) and 1e-6 (0.5): W x + s B A x against (W + s B A) x in fp32


def pipeline_class(folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return StableDiffusionXLPipeline if index["_class_name"] == "StableDiffusionXLPipeline" else StableDiffusionPipeline


def load(folder: Path, **kwargs):
    return pipeline_class(folder).from_pretrained(folder, **kwargs)


@pytest.fixture(scope="module")
def tiny_sd2_model(tiny_model, tmp_path_factory) -> Path:
    """tiny_model with an OpenCLIP-like text encoder (exact GELU), as SD 2.x has."""
    from transformers import CLIPTextModel

    pipe = load(tiny_model)
    config = copy.deepcopy(pipe.text_encoder.config)
    config.hidden_act = "gelu"
    torch.manual_seed(2)
    pipe.text_encoder = CLIPTextModel(config)
    folder = tmp_path_factory.mktemp("tiny-sd2") / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl_wide_model(tiny_sdxl_model, tmp_path_factory) -> Path:
    """tiny_sdxl_model with a second text encoder wider than the first, as in SDXL (768 and 1280).

    diffusers' single-file loader tells SDXL's two encoders apart by width: when both are 32 wide (the shared
    fixture), it fills text_encoder_2 from the first encoder's weights and leaves the projection unloaded.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipe = load(tiny_sdxl_model)
    config = copy.deepcopy(pipe.text_encoder_2.config)
    config.hidden_size, config.intermediate_size = 48, 53
    torch.manual_seed(3)
    pipe.text_encoder_2 = CLIPTextModelWithProjection(config)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48})
    folder = tmp_path_factory.mktemp("tiny-sdxl-wide") / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


MODELS = {"sd1": "tiny_model", "sd2": "tiny_sd2_model", "sdxl": "tiny_sdxl_wide_model"}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(expected, actual, dtype=None) -> None:
    """Every tensor of every model component of `actual` equals `expected`'s (cast to `dtype` first)."""
    for name in COMPONENTS:
        if getattr(expected, name, None) is None:
            continue
        want, got = getattr(expected, name).state_dict(), getattr(actual, name).state_dict()
        assert set(got) == set(want), name
        for key, tensor in want.items():
            tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            assert not got[key].is_meta, f"{name}.{key} was not loaded"
            assert torch.equal(got[key], tensor), f"{name}.{key} differs"


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_single_file_loads_back_identical(family, dtype, request, tmp_path):
    folder = request.getfixturevalue(MODELS[family])
    pipe = load(folder)
    path = tmp_path / "model.safetensors"
    write_single_file(pipe, path, dtype)
    # A local config folder is all from_single_file needs offline: it reads configs, scheduler and tokenizer
    # from there and asks the hub nothing (no local_files_only needed).
    back = pipeline_class(folder).from_single_file(str(path), config=str(folder), dtype=dtype)
    assert_same_weights(pipe, back, dtype)
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


# Keys by which AUTOMATIC1111 / ComfyUI / diffusers tell the families apart, and the VAE's 1x1 convolutions.
LAYOUT_MARKERS = {
    "sd1": ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    "sd2": ["cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "cond_stage_model.model.ln_final.weight"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection",
             "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
             "model.diffusion_model.label_emb.0.0.weight"],
}
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
# The modules of the original UNetModel built with tiny_model's settings (channel_mult (1, 2), one resnet per
# level, attention on the second level), written out by hand from the LDM code. diffusers' own loader also
# accepts an upsampler misplaced at `.1.conv` after an attention, so only this list pins `.2.conv` there.
TINY_SD1_UNET_MODULES = {
    "time_embed.0", "time_embed.2", "input_blocks.0.0", "input_blocks.1.0", "input_blocks.2.0.op",
    "input_blocks.3.0", "input_blocks.3.1", "middle_block.0", "middle_block.1", "middle_block.2",
    "output_blocks.0.0", "output_blocks.0.1", "output_blocks.1.0", "output_blocks.1.1", "output_blocks.1.2.conv",
    "output_blocks.2.0", "output_blocks.3.0", "out.0", "out.2",
}


def unet_modules(state) -> set[str]:
    """The top modules of the original UNet in `state`: a block's entries, with a sampler's own layer."""
    modules = set()
    for key in state:
        if key.startswith("model.diffusion_model."):
            parts = key.removeprefix("model.diffusion_model.").split(".")
            depth = 3 if parts[0] in ("input_blocks", "output_blocks") else 2
            depth += parts[depth:depth + 1] in (["op"], ["conv"])
            modules.add(".".join(parts[:depth]))
    return modules


@pytest.mark.parametrize("family", MODELS)
def test_single_file_keys_follow_the_original_layout(family, request):
    pipe = load(request.getfixturevalue(MODELS[family]))
    state = original_state_dict(pipe)
    for key in LAYOUT_MARKERS[family] + ["model.diffusion_model.input_blocks.0.0.weight",
                                          "model.diffusion_model.out.2.weight", "first_stage_model.quant_conv.weight"]:
        assert key in state, key
    assert all(key.startswith(PREFIXES) for key in state)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert not any(key.startswith("cond_stage_model.model.text_projection") for key in state)  # SD 2 has none
    if family == "sd1":
        assert unet_modules(state) == TINY_SD1_UNET_MODULES
    assert base_model_version(pipe) == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]


def add_random_lora(pipe, folder: Path, unet_targets=UNET_TARGETS, text_targets=TEXT_TARGETS):
    """Give `pipe` LoRA adapters as the trainer does (peft, then diffusers' save_lora_weights with the
    LoraConfigs as metadata), with B random so the LoRA changes the outputs; write them to `folder`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    generator = torch.Generator().manual_seed(0)
    saved = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if name == "vae" or module is None:
            continue
        rank, alpha = LORA_SHAPES[name]
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=unet_targets if name == "unet" else text_targets)
        torch.manual_seed(0)  # peft draws A from the global generator
        module.add_adapter(config)
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        saved[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        saved[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(str(folder), safe_serialization=True, **saved)
    return folder / "pytorch_lora_weights.safetensors"


def render(pipe) -> np.ndarray:
    return pipe(prompt="a photo of cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def expected_deltas(pipe) -> dict[str, torch.Tensor]:
    """What each adapted layer adds to its weight, B @ A * alpha / r, from peft's own layers, by kohya name."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    if getattr(pipe, "text_encoder_2", None) is not None:
        prefixes["text_encoder"] = "lora_te1_"
    deltas = {}
    for name, prefix in prefixes.items():
        module = getattr(pipe, name, None)
        for path, layer in module.named_modules() if module is not None else []:
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                path = path.removeprefix("text_model.")
                if name == "unet":
                    path = KOHYA_UNET_NAMES.get(path, path)
                elif path != "text_projection":
                    path = "text_model." + path
                delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
                deltas[prefix + path.replace(".", "_")] = delta.detach()
    return deltas


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model"])
def test_kohya_lora_draws_what_the_diffusers_lora_draws(model, request, tmp_path):
    folder = request.getfixturevalue(model)
    trained = load(folder)
    lora_file = add_random_lora(trained, tmp_path / "diffusers-lora")
    kohya = tmp_path / "kohya" / "subject.safetensors"
    write_kohya_lora(lora_file, kohya, "fp32", {"ss_learning_rate": 1e-4, "ss_max_train_steps": 400},
                     base_version=base_model_version(trained))

    with_diffusers_lora, with_kohya_lora = load(folder), load(folder)
    with_diffusers_lora.load_lora_weights(str(lora_file.parent))
    with_kohya_lora.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    expected = render(with_diffusers_lora)
    assert np.abs(render(load(folder)) - expected).max() > 100 * IMAGE_TOLERANCE  # the LoRA matters
    assert np.abs(render(with_kohya_lora) - expected).max() <= IMAGE_TOLERANCE

    # Module by module, the weight change the kohya file describes (up @ down * alpha / rank) is peft's.
    state = load_file(str(kohya))
    deltas = expected_deltas(trained)
    assert {key.rsplit(".", 1)[0] for key in state if key.endswith(".alpha")} == set(deltas)
    for name, delta in deltas.items():
        up, down, alpha = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"], state[f"{name}.alpha"]
        assert alpha.ndim == 0
        torch.testing.assert_close(up @ down * alpha / down.shape[0], delta, rtol=0, atol=1e-7)
    sdxl = model == "tiny_sdxl_model"
    assert any(key.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for key in state) == sdxl
    assert any(key.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for key in state) == sdxl
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for key in state) != sdxl
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in state

    with safe_open(str(kohya), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8.0")
    assert metadata["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert (metadata["ss_learning_rate"], metadata["ss_max_train_steps"]) == ("0.0001", "400")


def test_kohya_lora_on_every_linear_layer_draws_what_the_trained_model_draws(tiny_sdxl_model, tmp_path):
    """Adapters on every linear layer, the time and SDXL's added-conditioning embeddings among them, which
    kohya's loaders know by their original names (time_embed.0, label_emb.0.0).

    Compared with the model the adapters were trained in: diffusers' load_lora_weights misreads its own
    file of such a LoRA (the file mixes `lora.down` and `lora_A` keys; the loader converts by the first).
    """
    trained = load(tiny_sdxl_model)
    every_linear = [name for name, layer in trained.unet.named_modules() if isinstance(layer, torch.nn.Linear)]
    text_layers = TEXT_TARGETS + ["fc1", "fc2", "text_projection"]
    lora_file = add_random_lora(trained, tmp_path / "lora", every_linear, text_layers)
    kohya = tmp_path / "kohya" / "subject.safetensors"
    write_kohya_lora(lora_file, kohya, "fp32", base_version="sdxl_base_v1-0")
    state = load_file(str(kohya))
    for name in ("unet_time_embed_0", "unet_label_emb_0_2", "unet_down_blocks_1_resnets_0_time_emb_proj",
                 "te2_text_projection", "te1_text_model_encoder_layers_0_mlp_fc1"):
        assert f"lora_{name}.alpha" in state, name
    assert {key.rsplit(".", 1)[0] for key in state if key.endswith(".alpha")} == set(expected_deltas(trained))
    with_kohya_lora = load(tiny_sdxl_model)
    with_kohya_lora.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    assert np.abs(render(with_kohya_lora) - render(trained)).max() <= IMAGE_TOLERANCE


def test_kohya_lora_in_fp16_is_the_fp16_cast(tiny_model, tmp_path):
    lora_file = add_random_lora(load(tiny_model), tmp_path / "lora")
    write_kohya_lora(lora_file, tmp_path / "fp32.safetensors", "fp32", base_version="sd_v1")
    write_kohya_lora(lora_file, tmp_path / "fp16.safetensors", torch.float16, base_version="sd_v1")
    full, half = load_file(str(tmp_path / "fp32.safetensors")), load_file(str(tmp_path / "fp16.safetensors"))
    assert set(full) == set(half)
    for key, tensor in full.items():
        # alpha stays fp32: in fp16 a non-integer alpha / rank would round.
        assert torch.equal(half[key], tensor if key.endswith(".alpha") else tensor.half()), key


def test_kohya_alpha_follows_rslora_and_alpha_pattern():
    down, up = torch.ones(4, 3), torch.ones(5, 4)
    lora = {"unet.mid_block.attn.to_q.lora_A.weight": down, "unet.mid_block.attn.to_q.lora_B.weight": up,
            "unet.mid_block.attn.to_k.lora_A.weight": down, "unet.mid_block.attn.to_k.lora_B.weight": up}
    config = {"lora_alpha": 8, "alpha_pattern": {"to_k": 2}, "use_rslora": True}
    state = kohya_state_dict(lora, {"unet": config}, "sd")
    # rsLoRA scales by alpha / sqrt(r): 8 / 2 = 4 = kohya alpha 16 / rank 4; the pattern gives to_k alpha 2.
    assert state["lora_unet_mid_block_attn_to_q.alpha"].item() == 16.0
    assert state["lora_unet_mid_block_attn_to_k.alpha"].item() == 4.0
    with pytest.raises(ValueError, match="lora_alpha"):
        kohya_state_dict(lora, {}, "sd")


def unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    tokens = pipe.tokenizer(["a photo of cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = pipe.text_encoder(tokens.input_ids)[0]
        return pipe.unet(latents, 500, encoder_hidden_states=text).sample


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_lora_computes_what_the_unmerged_lora_computes(scale, tiny_model, tmp_path):
    lora_file = add_random_lora(load(tiny_model), tmp_path / "lora")
    unmerged, merged = load(tiny_model), load(tiny_model)
    for pipe in (unmerged, merged):
        pipe.load_lora_weights(str(lora_file.parent), adapter_name="subject")
    unmerged.set_adapters(["subject"], adapter_weights=[scale])
    expected = unet_output(unmerged)
    assert (expected - unet_output(load(tiny_model))).abs().max() > 100 * MERGE_TOLERANCE  # the LoRA matters

    merge_lora(merged, scale)
    assert not any(hasattr(layer, "lora_A") for layer in merged.unet.modules())  # a plain model again
    assert not any(hasattr(layer, "lora_A") for layer in merged.text_encoder.modules())
    torch.testing.assert_close(unet_output(merged), expected, rtol=0, atol=MERGE_TOLERANCE)
    write_single_file(merged, tmp_path / "merged.safetensors", "fp32")  # exports like any plain model


def test_single_file_refuses_unmerged_adapters(tiny_model, tmp_path):
    pipe = load(tiny_model)
    pipe.load_lora_weights(str(add_random_lora(load(tiny_model), tmp_path / "lora").parent))
    with pytest.raises(ValueError, match="merge"):
        write_single_file(pipe, tmp_path / "out" / "model.safetensors", "fp16")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_diffusers_folder_in_fp16_replaces_the_old_one(tiny_model, tmp_path):
    expected = load(tiny_model)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    write_diffusers_folder(load(tiny_model), out, "fp16")
    for weights in out.glob("*/*.safetensors"):
        assert {tensor.dtype for tensor in load_file(str(weights)).values()} == {torch.float16}, weights
    assert_same_weights(expected, load(out, dtype=torch.float16), torch.float16)
    assert not (out / "stale.txt").exists()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["exported"]  # no temporary folder left
    assert all(path.suffix != ".bin" for path in out.rglob("*"))  # safetensors only
