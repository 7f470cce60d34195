"""The benchmarks run (quick mode): the numbers themselves belong to benchmarks/, never to timed tests.

Also the random-weight pipelines train_speed.py trains on a GPU (random_models.py), and its GPU table's
code path with miniature stand-ins on the CPU (`--gpu-models-on-cpu`); nothing here builds SD 1.5 or SDXL with
weights (4.3 and 14 GB in fp32).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth.png_metadata import read_png_record

from conftest import build_tiny_pipeline, build_tiny_sdxl_pipeline, require_shipped_weights

ROOT = Path(__file__).resolve().parents[1]


def random_models():
    """benchmarks/random_models.py as a module."""
    spec = importlib.util.spec_from_file_location("random_models", ROOT / "benchmarks" / "random_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameter_counts(pipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module)}


@pytest.mark.slow
def test_train_speed_quick_mode_writes_its_table_and_json(tmp_path):
    require_shipped_weights()
    output = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--quick", "--threads", "1",
                             "--json", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "speed-up" in result.stdout
    runs = json.loads(output.read_text())["miniworld"]
    assert set(runs) == {"False", "True", "round_speedups"} and len(runs["round_speedups"]) == 1
    for run in (runs["False"], runs["True"]):
        assert run["median_step_seconds"] > 0 and run["peak_rss_mb"] > 0 and len(run["losses"]) == 4


@pytest.mark.slow
def test_class_images_speed_quick_mode_writes_its_table_json_and_grid(tmp_path):
    require_shipped_weights()
    output, grid = tmp_path / "speed.json", tmp_path / "grid.png"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "class_images_speed.py"), "--quick",
                             "--threads", "1", "--output", str(tmp_path / "images"), "--grid", str(grid),
                             "--json", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vs baseline" in result.stdout
    measured = json.loads(output.read_text())["models"]["miniworld"]
    configs = measured["configs"]
    assert [(configs[name]["scheduler"], configs[name]["steps"]) for name in ("default", "baseline")] == [
        ("dpm++", 25), ("pndm", 50)]
    for config in configs.values():
        assert config["images"] == 4 and config["images_per_second"] > 0 and config["ratio_to_baseline"] > 0
    quality = measured["quality"]
    assert quality["pixel_mad_same_seed"] < quality["pixel_mad_different_seeds"]
    assert measured["grid"] == str(grid)
    cells = read_png_record(grid)["cells"]
    with Image.open(grid) as image:
        assert len(cells) == 2 * 4  # rows = the two settings, columns = the four seeds
        # Every 64 px image shown at one whole multiple of its size, with room left for the labels.
        (side, side_too), = {(right - left, bottom - top) for left, top, right, bottom in cells}
        assert side == side_too and side % 64 == 0
        assert image.width > 4 * side and image.height > 2 * side


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_random_pipeline_from_reference_configs_alone_loads_with_their_parameter_counts(tmp_path, name):
    """A reference of configs only (no weights, no tokenizer, no scheduler: what `write_reference_configs`
    writes), here the stand-in's miniature one: the pipeline loads with diffusers, has exactly the parameter
    counts the memory estimate builds from those configs, a tokenizer whose ids fit the encoders, and the same
    weights on every build (seed 0)."""
    from diffusers import DiffusionPipeline

    from dreambooth.meta_models import empty_models

    module = random_models()
    reference = module.write_reference(tmp_path / "reference", name, stand_in=True)
    assert sorted(path.name for path in reference.iterdir()) == sorted(
        ["model_index.json", "unet", "vae", "text_encoder"] + (["text_encoder_2"] if name == "sdxl" else []))
    built = module.build_random_pipeline(reference, tmp_path / "pipeline")
    pipeline = DiffusionPipeline.from_pretrained(built)
    counts = parameter_counts(pipeline)
    assert counts == {part: sum(p.numel() for p in model.parameters())
                      for part, model in empty_models(str(reference)).items()}
    assert type(pipeline).__name__ == ("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline")
    ids = pipeline.tokenizer("a photo of miru cat by the sea").input_ids
    assert max(ids) < pipeline.text_encoder.config.vocab_size and len(ids) > 3
    assert pipeline.tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings
    assert pipeline.unet.conv_in.weight.std() > 0
    again = module.build_random_pipeline(reference, tmp_path / "again")
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (built / weights).read_bytes() == (again / weights).read_bytes()


@pytest.mark.parametrize("builder", [build_tiny_pipeline, build_tiny_sdxl_pipeline])
def test_random_pipeline_keeps_the_references_tokenizers_and_scheduler(tmp_path, builder):
    """A reference that has tokenizers and a scheduler (the test suite's tiny pipelines, weights removed) keeps
    them; the models get the original's parameter counts, with other (random) weights."""
    from diffusers import DiffusionPipeline

    original_folder = builder(tmp_path / "original")
    reference = tmp_path / "reference"
    shutil.copytree(original_folder, reference, ignore=shutil.ignore_patterns("*.safetensors"))
    pipeline = DiffusionPipeline.from_pretrained(random_models().build_random_pipeline(reference, tmp_path / "random"))
    original = DiffusionPipeline.from_pretrained(original_folder)
    assert parameter_counts(pipeline) == parameter_counts(original)
    assert pipeline.tokenizer.get_vocab() == original.tokenizer.get_vocab()
    assert type(pipeline.scheduler) is type(original.scheduler)
    assert not torch.equal(pipeline.unet.conv_in.weight, original.unet.conv_in.weight)


def test_random_pipeline_reads_the_full_size_references_without_weights(tmp_path):
    """The real SD 1.5 reference: its UNet built on the meta device by the builder's own code (no memory), with
    SD 1.5's parameter count; the reference has no tokenizer, and the one built instead fits SD 1.5's and
    SDXL's CLIP vocabularies."""
    from dreambooth.miniworld.components import build_tokenizer

    module = random_models()
    reference = module.write_reference(tmp_path / "sd15", "sd15")
    assert not (reference / "tokenizer").exists() and not (reference / "scheduler").exists()
    with torch.device("meta"):
        unet = module.random_component(reference, "unet", "diffusers", "UNet2DConditionModel")
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    tokenizer = build_tokenizer(tmp_path / "tokenizer", 77)
    for name, encoders in (("sd15", ["text_encoder"]), ("sdxl", ["text_encoder", "text_encoder_2"])):
        folder = module.write_reference(tmp_path / f"{name}-configs", name)
        for encoder in encoders:
            config = json.loads((folder / encoder / "config.json").read_text())
            assert len(tokenizer) <= config["vocab_size"] and config["max_position_embeddings"] == 77


@pytest.mark.slow
def test_train_speed_gpu_table_runs_with_cpu_stand_ins(tmp_path):
    """The GPU table's code path end to end, in its stand-in mode: references written, random pipelines built,
    each configuration trained with and without the cache in its own process, beside its memory estimate."""
    output = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--gpu-models-on-cpu",
                             "--models", "--gpu-models", "sd15-full", "sdxl-lora", "--steps", "2", "--repeats", "1",
                             "--threads", "1", "--json", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cache peak/est." in result.stdout and "no-cache ms/step" in result.stdout
    measured = json.loads(output.read_text())
    assert set(measured) == {"gpu_models"}
    configs = measured["gpu_models"]
    assert set(configs) == {"sd15-full", "sdxl-lora"}
    assert [configs[name]["reference"] for name in ("sd15-full", "sdxl-lora")] == ["sd15", "sdxl"]
    assert configs["sd15-full"]["settings"]["mixed_precision"] == "bf16"  # fp16 needs a GPU
    assert configs["sdxl-lora"]["settings"]["lora_rank"] == 16
    for config in configs.values():
        assert config["stand_in"] and config["resolution"] == 32
        for run in (config["False"], config["True"]):
            assert run["median_step_seconds"] > 0 and len(run["losses"]) == 2
            assert run["peak_kind"] == "process RSS" and run["peak_bytes"] > 0 and run["estimate_peak_bytes"] > 0


@pytest.mark.slow
def test_run_all_quick_mode_prints_both_tables_and_merges_their_json(tmp_path):
    require_shipped_weights()
    output = tmp_path / "all.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--threads", "1",
                             "--output", str(tmp_path / "out"), "--json", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "speed-up" in result.stdout and "vs baseline" in result.stdout
    merged = json.loads(output.read_text())
    assert merged["quick"] and merged["threads"] == 1
    assert set(merged["train_speed"]["miniworld"]) == {"False", "True", "round_speedups"}
    assert merged["class_images_speed"]["models"]["miniworld"]["configs"]["default"]["images"] == 4
    assert (tmp_path / "out" / "class-images" / "grid.png").exists()
