"""The command line end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RESOLUTION, write_images


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dreambooth", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_class_images_train_generate_end_to_end(tiny_model, instance_dir, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"instance_prompt: a photo of miru cat\nresolution: {TINY_RESOLUTION}\n"
                      "learning_rate: 1e-4\nmax_train_steps: 5\n")
    result = run_cli("class-images", "--model", str(tiny_model), "--prompt", "a photo of a cat", "--num-images", "2",
                     "--steps", "2", "--output", str(tmp_path / "cats"))
    assert result.returncode == 0, result.stderr
    result = run_cli("train", "--config", str(config), "--model", str(tiny_model), "--instance-dir", str(instance_dir),
                     "--class-dir", str(tmp_path / "cats"), "--class-prompt", "a photo of a cat",
                     "--num-class-images", "2", "--max-train-steps", "2", "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the flag beat the file's 5
    result = run_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "a photo of miru cat by the sea",
                     "--steps", "2", "--guidance", "6", "12", "--seeds", "0", "1",
                     "--output", str(tmp_path / "samples"))
    assert result.returncode == 0, result.stderr
    manifest = [json.loads(line) for line in (tmp_path / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 and (tmp_path / "samples" / "grid.png").is_file()


def bad_inputs(tmp_path: Path, tiny_model: Path, instance_dir: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    write_images(broken, 2)
    truncated = broken / "img01.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "config.yaml").write_text("model: x\n")
    base = ["train", "--model", str(tiny_model), "--instance-prompt", "a photo of miru cat"]
    good = base + ["--instance-dir", str(instance_dir), "--output", str(tmp_path / "out")]
    return [
        (base + ["--instance-dir", str(tmp_path / "missing"), "--output", str(tmp_path / "o1")], "--instance-dir"),
        (base + ["--instance-dir", str(empty), "--output", str(tmp_path / "o2")], "no images"),
        (base + ["--instance-dir", str(broken), "--output", str(tmp_path / "o3")], "img01.png"),
        (["train", "--model", str(tmp_path), "--instance-prompt", "p", "--instance-dir", str(instance_dir),
          "--output", str(tmp_path / "o4")], "not a diffusers pipeline"),
        (["train", "--model", "someone/not-cached", "--instance-prompt", "p", "--instance-dir", str(instance_dir),
          "--output", str(tmp_path / "o5")], "offline"),
        (good + ["--resolution", "500"], "--resolution 500"),
        (good + ["--max-train-steps", "0"], "--max-train-steps 0"),
        (good + ["--learning-rate", "-1e-6"], "--learning-rate"),
        (good + ["--class-dir", str(tmp_path / "cats")], "--class-dir needs --class-prompt"),
        (good + ["--instance-mask-dir", str(write_images(tmp_path / "masks", 1, prefix="unrelated")[0].parent)],
         "no mask for"),
        (base + ["--instance-dir", str(instance_dir), "--output", str(other_run)], "--resume"),
        (good + ["--max-train-steps", "many"], "invalid int value"),
        (good + ["--validation-steps", "5"], "--validation-steps is now --validation-sampling-steps"),
        (good + ["--lora-rank", "0"], "--lora-rank 0: must be greater than 0"),
        (good + ["--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
        (["generate", "--model", str(tiny_model), "--prompt", "p", "--output", str(tmp_path / "g"),
          "--scheduler", "fast"], "--scheduler"),
        (["demo", "--num-seeds", "0", "--output", str(tmp_path / "d")], "--num-seeds 0"),
    ]


def test_every_bad_input_is_one_line_and_exit_status_2(tiny_model, instance_dir, tmp_path):
    for args, expected in bad_inputs(tmp_path, tiny_model, instance_dir):
        result = run_cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "torchvision" not in line]
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert any(expected in line for line in lines), (expected, result.stderr)
        assert sum("error" in line for line in lines) == 1, result.stderr
    assert [path.name for path in (tmp_path / "other-run").iterdir()] == ["config.yaml"]  # nothing added
    assert (tmp_path / "other-run" / "config.yaml").read_text() == "model: x\n"  # untouched


# A GPU running out of memory mid-step, made to happen on a CPU: the training UNet's forward raises what CUDA's
# allocator raises (the estimate's UNet, on the meta device, holds no memory and runs).
OUT_OF_MEMORY = """
import sys, torch
from diffusers import UNet2DConditionModel
from dreambooth.cli import main

def allocate(module, args):
    if isinstance(module, UNet2DConditionModel) and module.device.type != "meta":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

torch.nn.modules.module.register_module_forward_pre_hook(allocate)
sys.exit(main(sys.argv[1:]))
"""


def test_out_of_memory_is_one_line_with_what_would_fit(tiny_model, instance_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, "train", "--model", str(tiny_model),
                             "--instance-dir", str(instance_dir), "--instance-prompt", "a photo of miru cat",
                             "--resolution", str(TINY_RESOLUTION), "--gradient-checkpointing",
                             "--output", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = lines
    assert line.startswith("dreambooth train: error: out of GPU memory: this run needs about")
    assert "--lora-rank" in line and "--gradient-checkpointing" not in line  # only switches not already on


def test_debug_shows_the_traceback(tmp_path, instance_dir):
    result = run_cli("train", "--debug", "--model", str(tmp_path), "--instance-prompt", "p", "--instance-dir",
                     str(instance_dir), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" in result.stderr


@pytest.mark.parametrize("command", ["class-images", "train", "generate"])
def test_help_lists_every_flag(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "--model" in result.stdout and "--config" in result.stdout


def test_demo_help_lists_the_demo_settings():
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    for flag in ("--max-train-steps", "--token-embedding-learning-rate", "--no-compare-without-prior", "--overwrite"):
        assert flag in result.stdout, flag
