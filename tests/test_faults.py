"""Faults a run meets in the wild, each ending with nothing lost: signals, kill -9 (also inside a checkpoint write),
a full disk. Runs are real `dreambooth` processes on the tiny model; every interrupted run is continued and must end
bit for bit where an uninterrupted one does."""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreambooth.cli import main
from dreambooth.train import train

from conftest import TINY_RESOLUTION
from test_train import make_config, max_difference, weights

SETTINGS = ["--instance-prompt", "a photo of miru cat", "--resolution", str(TINY_RESOLUTION), "--learning-rate",
            "1e-3", "--seed", "3"]  # make_config's, so an in-process run with them is the uninterrupted reference
KILLER = """
import os, signal, sys
import safetensors.torch
write = safetensors.torch.save_file
def save_file(tensors, filename, metadata=None):  # killed right after one file of checkpoint {step} is written
    write(tensors, filename, metadata)
    if ".step-{step:06d}.tmp" in str(filename):
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_file
from dreambooth.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_env() -> dict[str, str]:
    """This process's thread count for a child: float sums over other thread counts differ in the last bits, and an
    interrupted run is compared bit for bit with a reference computed here."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def default_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # CI may start the tests with SIGINT ignored; a child inherits it


def start_train(tiny_model: Path, instance_dir: Path, output: Path, *extra: str, code: str | None = None):
    command = [sys.executable, *(["-c", code] if code else ["-m", "dreambooth"]), "train", "--model", str(tiny_model),
               "--instance-dir", str(instance_dir), "--output", str(output), *SETTINGS, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=default_ctrl_c)


def wait_for_steps(process: subprocess.Popen, output: Path, steps: int) -> None:
    deadline = time.monotonic() + 120
    metrics = output / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no training steps within two minutes"
        time.sleep(0.05)


_straight: dict[int, dict[str, torch.Tensor]] = {}


def straight_unet(tiny_model: Path, instance_dir: Path, root: Path, steps: int) -> dict[str, torch.Tensor]:
    """The UNet of an uninterrupted run of `steps` steps (one run per length in the session)."""
    if steps not in _straight:
        paths = train(make_config(tiny_model, instance_dir, root / f"straight-{steps}", max_train_steps=steps))
        _straight[steps] = weights(paths.pipeline, "unet")
    return _straight[steps]


def recorded_steps(output: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_prints_the_command_that_resumes(signum, tiny_model, instance_dir,
                                                                                    tmp_path):
    output = tmp_path / "run"
    process = start_train(tiny_model, instance_dir, output, "--max-train-steps", "100000", "--log-every", "1")
    wait_for_steps(process, output, 2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    last = stderr.strip().splitlines()[-1]
    found = re.fullmatch(rf"dreambooth train: stopped at step (\d+) of 100000 \({signal.Signals(signum).name}\); "
                         r"checkpoint (\S+); continue with: (dreambooth train .* --resume)", last)
    assert found, last
    stopped = int(found.group(1))
    assert Path(found.group(2)) == output / "checkpoints" / f"step-{stopped:06d}" and Path(found.group(2)).is_dir()
    assert recorded_steps(output) == list(range(1, stopped + 1))
    assert not (output / ".dreambooth.lock").exists()

    # The printed command, as printed (run here in-process), continues the run to where a straight one ends.
    total = max(stopped + 1, 8)
    assert main(shlex.split(found.group(3))[1:] + ["--max-train-steps", str(total)]) == 0
    assert recorded_steps(output) == list(range(1, total + 1))
    expected = straight_unet(tiny_model, instance_dir, tmp_path.parent, total)
    assert max_difference(weights(output / "pipeline", "unet"), expected) == 0.0


def test_kill_9_during_steps_and_inside_a_checkpoint_write_loses_nothing(tiny_model, instance_dir, tmp_path):
    """Killed at a random step (checkpoints every 2), then, resumed, killed again while writing a checkpoint's files:
    each time --resume continues from the newest complete checkpoint and the run ends where a straight one does."""
    output = tmp_path / "run"
    process = start_train(tiny_model, instance_dir, output, "--max-train-steps", "100000", "--log-every", "1",
                          "--checkpoint-every", "2")
    wait_for_steps(process, output, 5)
    process.kill()
    process.wait()
    newest = max(int(folder.name.split("-")[1]) for folder in (output / "checkpoints").glob("step-*"))
    target = newest + 3
    process = start_train(tiny_model, instance_dir, output, "--max-train-steps", str(target), "--checkpoint-every",
                          "2", "--resume", code=KILLER.format(step=newest + 2))
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert (output / "checkpoints" / f".step-{newest + 2:06d}.tmp").is_dir()  # half written, never named
    resumed = train(make_config(tiny_model, instance_dir, output, max_train_steps=target, checkpoint_every=2,
                                resume=True))
    assert recorded_steps(output) == list(range(1, target + 1))
    assert not list((output / "checkpoints").glob(".*"))  # the half-written folder is gone
    expected = straight_unet(tiny_model, instance_dir, tmp_path.parent, target)
    assert max_difference(weights(resumed.pipeline, "unet"), expected) == 0.0


def full_disk(monkeypatch, where: str) -> None:
    """Make every safetensors write whose path contains `where` fail as a full disk does: part of the file written,
    then ENOSPC."""
    import accelerate.utils.other
    import safetensors.torch

    write = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if where not in str(filename):
            return write(tensors, filename, metadata)
        Path(filename).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", save_file)


@pytest.mark.parametrize("where", ["checkpoint", "final pipeline"])
def test_a_full_disk_is_one_line_leaves_no_partial_files_and_resume_finishes(where, tiny_model, instance_dir,
                                                                           tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    args = ["train", "--model", str(tiny_model), "--instance-dir", str(instance_dir), "--output", str(output),
            *SETTINGS, "--max-train-steps", "4", "--checkpoint-every", "2"]
    with monkeypatch.context() as patched:
        full_disk(patched, ".step-000004.tmp" if where == "checkpoint" else f"{os.sep}.pipeline.")
        assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert re.fullmatch(r"dreambooth train: error: the disk is full writing \S+; nothing complete was replaced: "
                        rf"free some space, then continue with dreambooth train --config {output}/config.yaml "
                        r"--resume", line), line
    leftovers = [path.name for path in output.rglob(".*") if path.name != ".dreambooth.lock"]
    assert leftovers == []  # no temporary file or folder stays to fill the disk
    complete = sorted(folder.name for folder in (output / "checkpoints").iterdir())
    assert complete == (["step-000002"] if where == "checkpoint" else ["step-000002", "step-000004"])
    assert not (output / "pipeline").exists()

    assert main(["train", "--config", str(output / "config.yaml"), "--resume"]) == 0
    expected = straight_unet(tiny_model, instance_dir, tmp_path.parent, 4)
    assert max_difference(weights(output / "pipeline", "unet"), expected) == 0.0
    assert recorded_steps(output) == [1, 2, 3, 4]


IMAGE_KILLER = """
import os, signal, sys
from PIL import Image
save, saved = Image.Image.save, []
def killed_on_the_third(self, fp, *args, **kwargs):  # half of the third image written, then kill -9
    if len(saved) == 2:
        open(fp, "wb").write(b"\\x89PNG half")
        os.kill(os.getpid(), signal.SIGKILL)
    saved.append(fp)
    return save(self, fp, *args, **kwargs)
Image.Image.save = killed_on_the_third
from dreambooth.cli import main
sys.exit(main(sys.argv[1:]))
"""


def image_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.png"))
            if not path.name.startswith(".")}


@pytest.mark.parametrize("command", ["generate", "class-images"])
def test_kill_9_while_rendering_then_the_same_command_finishes_the_set(command, tiny_model, tmp_path):
    """Killed inside the third image's write; the same command again removes the partial file, renders only what is
    missing, and the folder's images equal an uninterrupted run's byte for byte."""
    def args(output: Path) -> list[str]:
        if command == "generate":
            return ["generate", "--model", str(tiny_model), "--prompt", "a photo of a cat", "--steps", "2",
                    "--guidance", "3", "--seeds", "0", "1", "2", "3", "--batch-size", "1",
                    "--height", str(TINY_RESOLUTION), "--width", str(TINY_RESOLUTION), "--output", str(output)]
        return ["class-images", "--model", str(tiny_model), "--prompt", "a photo of a cat", "--num-images", "4",
                "--steps", "2", "--batch-size", "1", "--output", str(output)]

    assert main(args(tmp_path / "straight")) == 0
    killed = subprocess.run([sys.executable, "-c", IMAGE_KILLER, *args(tmp_path / "run")], capture_output=True,
                            text=True, env=child_env(), timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = [path.name for path in (tmp_path / "run").rglob(".*.tmp*")]
    assert len(partial) == 1 and len(image_bytes(tmp_path / "run")) == 2
    assert main(args(tmp_path / "run")) == 0
    assert not list((tmp_path / "run").rglob(".*.tmp*"))
    assert image_bytes(tmp_path / "run") == image_bytes(tmp_path / "straight")
    manifest = (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4 and len({line for line in manifest}) == 4  # every image listed once


def test_a_full_disk_while_generating_is_one_line_and_the_same_command_finishes(tiny_model, tmp_path, monkeypatch,
                                                                               capsys):
    from PIL import Image

    args = ["generate", "--model", str(tiny_model), "--prompt", "a photo of a cat", "--steps", "2", "--guidance",
            "3", "--seeds", "0", "1", "2", "--batch-size", "1", "--height", str(TINY_RESOLUTION), "--width",
            str(TINY_RESOLUTION), "--output", str(tmp_path / "run")]
    save, calls = Image.Image.save, []

    def full_on_the_second(self, fp, *rest, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        return save(self, fp, *rest, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "save", full_on_the_second)
        assert main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"dreambooth generate: error: the disk is full writing \S+\.png; nothing complete was "
                        r"replaced: free some space, then run the same command again", line), line
    assert not list((tmp_path / "run").rglob(".*.tmp*")) and len(image_bytes(tmp_path / "run")) == 1
    assert main(args) == 0
    assert len(image_bytes(tmp_path / "run")) == 4  # three images and the grid


@pytest.mark.parametrize("megabytes", [25, 30])  # the third checkpoint's weights (safetensors), its optimizer (torch)
def test_a_real_full_disk_is_one_line_and_the_printed_command_finishes_once_there_is_space(megabytes, tiny_model,
                                                                                          instance_dir, tmp_path,
                                                                                          capsys):
    """Not a simulation: a filesystem too small for a third checkpoint. torch and safetensors each word a full disk
    their own way (a RuntimeError, a SafetensorError); both end in the one line."""
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(small)],
                           capture_output=True)
    if mount.returncode:
        pytest.skip("cannot mount a small filesystem here (it takes root)")
    try:
        output = small / "run"
        assert main(["train", "--model", str(tiny_model), "--instance-dir", str(instance_dir), "--output", str(output),
                     *SETTINGS, "--max-train-steps", "5", "--checkpoint-every", "1"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(r"dreambooth train: error: the disk is full writing \S+; nothing complete was replaced: "
                            r"free some space, then continue with dreambooth train --config \S+ --resume", line), line
        assert [path.name for path in output.rglob(".*") if path.name != ".dreambooth.lock"] == []
        assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
        subprocess.run(["mount", "-o", "remount,size=200m", str(small)], check=True)
        assert main(["train", "--config", str(output / "config.yaml"), "--resume"]) == 0
        expected = straight_unet(tiny_model, instance_dir, tmp_path.parent, 5)
        assert max_difference(weights(output / "pipeline", "unet"), expected) == 0.0
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_full_disk_before_the_run_has_settings_says_to_run_the_command_again(tiny_model, instance_dir, tmp_path,
                                                                              monkeypatch, capsys):
    from PIL import Image

    def full(self, fp, *rest, **kwargs):  # the first class image the run tops its folder up with
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    assert main(["train", "--model", str(tiny_model), "--instance-dir", str(instance_dir), "--output",
                 str(tmp_path / "run"), *SETTINGS, "--class-dir", str(tmp_path / "class"), "--class-prompt",
                 "a photo of a cat", "--num-class-images", "1", "--class-image-steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("free some space, then run the same command again")
    assert not (tmp_path / "run" / "config.yaml").exists()
