"""`dreambooth export` on real runs, through the command line: what it writes loads back where users load it
(diffusers' from_single_file and load_lora_weights) and draws what the run draws; every mistake is one line,
exit status 2, nothing written. Also a single-file MODEL read offline with --model-config."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth.cli import main
from dreambooth.models import load_pipeline
from dreambooth.sampling import SamplingSetting, render
from dreambooth.train import train

from conftest import TINY_RESOLUTION, write_images
from test_train import make_config

SETTING = SamplingSetting(steps=2, guidance=7.5, scheduler="ddim")
PROMPT = "a photo of miru cat"


def pixels(pipeline) -> np.ndarray:
    (image,) = render(pipeline, [PROMPT], [0], SETTING, height=TINY_RESOLUTION, width=TINY_RESOLUTION)
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    write_images(root / "instance", 3, seed=1)
    full = train(make_config(tiny_model, root / "instance", root / "full", max_train_steps=1, train_text_encoder=True))
    adapters = train(make_config(tiny_model, root / "instance", root / "lora", max_train_steps=2, lora_rank=4,
                                 lora_alpha=2.0, train_text_encoder=True, learning_rate=2e-2))
    embeddings = train(make_config(tiny_model, root / "instance", root / "lora-emb", max_train_steps=2, lora_rank=4,
                                   train_text_encoder=True, learning_rate=2e-2, identifier="miru",
                                   token_embedding_learning_rate=5e-2))
    return {"full": full.root, "lora": adapters.root, "lora-emb": embeddings.root, "root": root}


def export(*args: str) -> int:
    try:
        return main(["export", *map(str, args)])
    except SystemExit as exit:  # argparse's own mistakes (an unknown choice) exit from inside main
        return exit.code


def test_full_run_as_single_file_loads_back_to_the_same_weights(tiny_model, runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "miru.safetensors"
    assert export(runs["full"], "--format", "single-file", "--dtype", "fp32", "--output", output) == 0
    loaded = StableDiffusionPipeline.from_single_file(str(output), config=str(tiny_model))
    trained = load_pipeline(str(runs["full"]))
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(trained, part).state_dict(), getattr(loaded, part).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours if "position_ids" not in key), part


def test_lora_run_as_kohya_draws_what_the_run_draws(tiny_model, runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "miru-lora.safetensors"
    assert export(runs["lora"], "--format", "kohya", "--dtype", "fp32", "--output", output) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_weights(str(tmp_path), weight_name=output.name)
    ours = pixels(load_pipeline(str(runs["lora"])))
    assert np.abs(pixels(pipeline) - ours).max() <= 1  # 8-bit pixels: identical up to rounding
    assert np.abs(pixels(StableDiffusionPipeline.from_pretrained(tiny_model)) - ours).max() > 10  # the LoRA shows
    from safetensors import safe_open

    with safe_open(str(output), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor(next(k for k in handle.keys() if k.endswith(".alpha"))).item() == 2.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_learning_rate"] == "0.02" and metadata["ss_max_train_steps"] == "2"


def test_kohya_export_says_the_trained_embeddings_stay_behind(runs, tmp_path, capsys):
    assert export(runs["lora-emb"], "--format", "kohya", "--output", tmp_path / "x.safetensors") == 0
    assert "embeddings.safetensors (the identifier's trained embedding rows) has no place" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_lora_run_draws_what_the_run_draws_at_that_scale(tiny_model, runs, tmp_path, scale):
    from diffusers import StableDiffusionPipeline

    single = tmp_path / "merged.safetensors"
    assert export(runs["lora-emb"], "--format", "single-file", "--merge-lora", "--lora-scale", scale,
                  "--dtype", "fp32", "--output", single) == 0
    folder = tmp_path / "merged-pipeline"
    assert export(runs["lora-emb"], "--format", "diffusers", "--merge-lora", "--lora-scale", scale,
                  "--dtype", "fp32", "--output", folder) == 0
    expected = pixels(load_pipeline(str(runs["lora-emb"]), lora_scale=scale))  # adapters and embedding rows
    assert np.abs(pixels(StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_model))) -
                  expected).max() <= 1
    assert np.abs(pixels(StableDiffusionPipeline.from_pretrained(folder)) - expected).max() <= 1


@pytest.mark.parametrize("run, args, message", [
    ("full", ["--format", "kohya", "--output", "x.safetensors"], "is a full fine-tune, not a LoRA run; use --format "
                                                                 "single-file"),
    ("full", ["--format", "single-file", "--merge-lora", "--output", "x.safetensors"], "it has no LoRA to merge"),
    ("lora", ["--format", "single-file", "--output", "x.safetensors"], "is a LoRA run; add --merge-lora"),
    ("lora", ["--format", "kohya", "--merge-lora", "--output", "x.safetensors"], "holds the adapters alone"),
    ("lora", ["--format", "kohya", "--lora-scale", "0.5", "--output", "x.safetensors"], "--lora-scale .* needs "
                                                                                       "--merge-lora"),
    ("full", ["--format", "single-file", "--output", "x.ckpt"], "is one .safetensors file; name it e.g. x.safetensors"),
    ("full", ["--format", "single-file", "--output", "taken.safetensors"], "exists; pass --overwrite"),
    ("full", ["--format", "zip", "--output", "x"], "invalid choice: 'zip'"),
])
def test_export_mistakes_are_one_line_and_write_nothing(runs, tmp_path, capsys, monkeypatch, run, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.safetensors").write_bytes(b"the user's file")
    assert export(runs[run], *args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert re.search(message, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
    assert (tmp_path / "taken.safetensors").read_bytes() == b"the user's file"


def test_overwrite_moves_the_old_export_aside(runs, tmp_path):
    output = tmp_path / "miru.safetensors"
    output.write_bytes(b"the user's file")
    assert export(runs["full"], "--format", "single-file", "--output", output, "--overwrite") == 0
    (moved,) = tmp_path.glob("replaced-*/miru.safetensors")
    assert moved.read_bytes() == b"the user's file" and output.stat().st_size > 1000


def test_single_file_model_works_offline_with_model_config(tiny_model, tiny_sdxl_model, runs, tmp_path, capsys):
    single = tmp_path / "model.safetensors"
    assert export(runs["full"], "--format", "single-file", "--dtype", "fp32", "--output", single) == 0
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(single), "--model-config", str(tiny_model), "--prompt", PROMPT,
                 "--steps", "2", "--output", str(samples)]) == 0
    assert len(list((samples / "images").glob("*.png"))) == 1
    run = tmp_path / "from-single-file"
    assert main(["train", "--model", str(single), "--model-config", str(tiny_model), "--instance-dir",
                 str(runs["root"] / "instance"), "--instance-prompt", PROMPT, "--max-train-steps", "1",
                 "--output", str(run)]) == 0
    assert (run / "pipeline" / "model_index.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(single), "--prompt", PROMPT, "--output", str(tmp_path / "no")]) == 2
    assert "pass --model-config with a diffusers folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(single), "--model-config", str(tiny_sdxl_model), "--prompt", PROMPT,
                 "--output", str(tmp_path / "no")]) == 2
    assert "describes an SDXL pipeline but" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
