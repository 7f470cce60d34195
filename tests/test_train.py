"""Training on a tiny real model: what is trained changes, what is frozen does not, resume is exact."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from dreambooth.config import OPTIMIZER_NAMES, TrainConfig
from dreambooth.errors import UserError
from dreambooth.prepare import learning_rate_schedule
from dreambooth.train import needs_checkpoint, needs_validation, sample_ids, step_generator, train

from conftest import TINY_RESOLUTION, write_images
from test_optimizers import RATES, runnable


def make_config(model: Path, instance_dir: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        model=str(model), instance_dir=str(instance_dir), instance_prompt="a photo of miru cat", output=str(output),
        resolution=TINY_RESOLUTION, max_train_steps=2, learning_rate=1e-3, seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    (file,) = (folder / component).glob("*.safetensors")
    return load_file(file)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_unet_changes_and_frozen_text_encoder_stays_bit_identical(tiny_model, instance_dir, tmp_path):
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run"))
    assert max_difference(weights(tiny_model, "unet"), weights(paths.pipeline, "unet")) > 1e-4
    base_text, tuned_text = weights(tiny_model, "text_encoder"), weights(paths.pipeline, "text_encoder")
    assert all(torch.equal(base_text[k], tuned_text[k]) for k in base_text)
    base_vae, tuned_vae = weights(tiny_model, "vae"), weights(paths.pipeline, "vae")
    assert all(torch.equal(a, b) for a, b in zip(base_vae.values(), tuned_vae.values()))


def test_train_text_encoder_changes_it(tiny_model, instance_dir, tmp_path):
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", train_text_encoder=True,
                              text_encoder_learning_rate=1e-3))
    assert max_difference(weights(tiny_model, "text_encoder"), weights(paths.pipeline, "text_encoder")) > 1e-5


def test_run_folder_holds_every_fixed_name(tiny_model, instance_dir, tmp_path):
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=3, save_pipeline_at=[2, 3],
                              validation_prompt=["a photo of miru cat"], validation_every=2,
                              validation_sampling_steps=2))
    at_step_2 = weights(paths.pipeline_at(2), "unet")
    assert max_difference(at_step_2, weights(paths.pipeline, "unet")) > 0
    assert max_difference(at_step_2, weights(tiny_model, "unet")) > 0
    assert not paths.pipeline_at(3).exists()  # the last step's pipeline is RUN/pipeline
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"step", "loss", "instance_loss", "lr", "grad_norm", "seconds"}
    assert records[0]["loss"] == pytest.approx(records[0]["instance_loss"])
    recorded = yaml.safe_load(paths.config.read_text())
    assert recorded["max_train_steps"] == 3 and recorded["_run"]["dreambooth_version"]
    assert paths.loss_plot.stat().st_size > 1000
    assert sorted(p.name for p in paths.validation.iterdir()) == ["step-000002", "step-000003"]
    assert len(list(paths.validation_step(3).glob("*.png"))) == 2
    assert "a photo of miru cat" in paths.model_card.read_text()


def test_saved_pipeline_loads_with_plain_diffusers_and_generates(tiny_model, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1))
    pipeline = StableDiffusionPipeline.from_pretrained(paths.pipeline)
    image = pipeline("a photo of miru cat", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)


def test_save_dtype_writes_half_weights_without_rounding_those_that_train_on(tiny_model, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    full = train(make_config(tiny_model, instance_dir, tmp_path / "fp32", max_train_steps=2))
    half = train(make_config(tiny_model, instance_dir, tmp_path / "fp16", max_train_steps=2, save_dtype="fp16",
                             save_pipeline_at=[1]))
    for component in ("unet", "text_encoder", "vae"):
        saved = weights(half.pipeline, component)
        assert {tensor.dtype for tensor in saved.values()} == {torch.float16}
        assert {tensor.dtype for tensor in weights(half.pipeline_at(1), component).values()} == {torch.float16}
        # Step 2 started from step 1's fp32 weights, not from the fp16 copy saved after step 1.
        expected = {key: tensor.half() for key, tensor in weights(full.pipeline, component).items()}
        assert max_difference(saved, expected) == 0.0
    pipeline = StableDiffusionPipeline.from_pretrained(half.pipeline, torch_dtype=torch.float16)
    assert pipeline.unet.dtype == torch.float16 and pipeline.vae.dtype == torch.float16


def test_resume_after_two_of_four_steps_equals_four_straight(tiny_model, instance_dir, tmp_path):
    straight = train(make_config(tiny_model, instance_dir, tmp_path / "straight", max_train_steps=4,
                                 train_text_encoder=True, lr_scheduler="linear", random_flip=True))
    interrupted = make_config(tiny_model, instance_dir, tmp_path / "resumed", max_train_steps=4, checkpoint_every=2,
                              train_text_encoder=True, lr_scheduler="linear", random_flip=True)
    started = time.monotonic()
    first = _train_until(interrupted, stop_after=2)
    first_wall = time.monotonic() - started
    assert [p.name for p in first.checkpoints.iterdir()] == ["step-000002"]
    interrupted.resume = True
    started = time.monotonic()
    resumed = train(interrupted)
    resumed_wall = time.monotonic() - started
    for component in ("unet", "text_encoder"):
        assert max_difference(weights(straight.pipeline, component), weights(resumed.pipeline, component)) == 0.0
    records = [json.loads(line) for line in resumed.metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    # The checkpoint's weights are safetensors: resuming runs no pickle code for them.
    checkpoint = resumed.checkpoint(2)
    assert list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("pytorch_model*.bin"))
    # Training seconds count on across the resume, and never exceed the time the two calls took.
    seconds = [record["seconds"] for record in records]
    assert 0 < seconds[0] < seconds[1] <= first_wall
    assert seconds[1] < seconds[2] < seconds[3] <= seconds[1] + resumed_wall


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_every_optimizer_trains_and_resumes_exactly(name, tiny_model, instance_dir, tmp_path):
    """The real trainer with each --optimizer: the UNet moves, and a run killed after its step-1 checkpoint
    and resumed ends bit for bit where the uninterrupted run does (the optimizer's state is in the checkpoint)."""
    options = dict(optimizer=name, learning_rate=RATES[name], max_train_steps=3, train_text_encoder=True,
                   text_encoder_learning_rate=RATES[name])
    straight = train(make_config(tiny_model, instance_dir, tmp_path / "straight", **options))
    interrupted = make_config(tiny_model, instance_dir, tmp_path / "resumed", checkpoint_every=1, **options)
    _train_until(interrupted, stop_after=1)
    interrupted.resume = True
    resumed = train(interrupted)
    base = weights(Path(tiny_model), "unet")
    assert max_difference(base, weights(straight.pipeline, "unet")) > 0
    for component in ("unet", "text_encoder"):
        assert max_difference(weights(straight.pipeline, component), weights(resumed.pipeline, component)) == 0.0
    assert yaml.safe_load(straight.config.read_text())["optimizer"] == name


def test_losses_are_read_every_log_every_steps_and_every_step_is_recorded(tiny_model, instance_dir, tmp_path,
                                                                          monkeypatch):
    import dreambooth.train as training

    flushes = []
    write_metrics = training.write_metrics

    def watched(pending, *args):
        flushes.append([step for step, _, _ in pending])
        return write_metrics(pending, *args)

    monkeypatch.setattr(training, "write_metrics", watched)
    every_third = train(make_config(tiny_model, instance_dir, tmp_path / "third", max_train_steps=7, log_every=3,
                                    checkpoint_every=5))
    # Steps 3 and 6 by the interval, 5 before its checkpoint, 7 at the end.
    assert flushes == [[1, 2, 3], [4, 5], [6], [7]]
    flushes.clear()
    every_step = train(make_config(tiny_model, instance_dir, tmp_path / "each", max_train_steps=7, log_every=1))
    assert flushes == [[step] for step in range(1, 8)]

    def numbers(paths):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in paths.metrics.read_text().splitlines()]

    assert numbers(every_third) == numbers(every_step) and len(numbers(every_step)) == 7


def test_a_diverging_run_stops_at_the_first_non_finite_step_with_its_checkpoints_and_metrics_intact(
        tiny_model, instance_dir, tmp_path):
    config = make_config(tiny_model, instance_dir, tmp_path / "run", learning_rate=1e6, max_train_steps=8,
                         checkpoint_every=1, keep_checkpoints=8, log_every=3)
    stopped_at = r"^step (\d+): the (loss|gradient norm) is (nan|inf), training stopped"
    with pytest.raises(UserError, match=stopped_at) as caught:
        train(config)
    stopped = int(caught.value.args[0].split(":")[0].removeprefix("step "))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # valid JSON: no bare NaN
    assert [record["step"] for record in records] == list(range(1, stopped))
    assert all(math.isfinite(record["loss"]) for record in records)
    checkpoints = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [f"step-{step:06d}" for step in range(1, stopped)]  # none of a non-finite step
    assert not (tmp_path / "run" / "pipeline").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_by_name(value, tiny_model, instance_dir, tmp_path):
    with pytest.raises(UserError, match=f"--learning-rate {float(value)}: must be a finite number"):
        make_config(tiny_model, instance_dir, tmp_path / "run", learning_rate=float(value))


@pytest.mark.parametrize("damaged", ["model*.safetensors", "optimizer.bin"])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_one_before(damaged, tiny_model, instance_dir, tmp_path,
                                                                     capsys):
    straight = train(make_config(tiny_model, instance_dir, tmp_path / "straight", max_train_steps=3))
    interrupted = make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=3, checkpoint_every=1,
                              keep_checkpoints=2)
    _train_until(interrupted, stop_after=2)
    (damaged_file,) = (tmp_path / "run" / "checkpoints" / "step-000002").glob(damaged)
    # Truncated weights, as a full disk or a crash leaves them, or a garbled pickle (loaded weights_only).
    damaged_file.write_bytes(damaged_file.read_bytes()[:1000] if damaged.endswith("safetensors") else b"\x80garbage")
    interrupted.resume = True
    resumed = train(interrupted)
    assert "step-000002 is damaged" in capsys.readouterr().err
    assert max_difference(weights(straight.pipeline, "unet"), weights(resumed.pipeline, "unet")) == 0.0
    assert [json.loads(line)["step"] for line in resumed.metrics.read_text().splitlines()] == [1, 2, 3]
    # Kept aside, not deleted, and no longer one of the --keep-checkpoints 2 (the new 2 and 3).
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000002", "step-000002.damaged", "step-000003"]
    for folder in (tmp_path / "run" / "checkpoints").iterdir():  # now every checkpoint is damaged: one line
        for file in folder.glob("model*.safetensors"):
            file.write_bytes(b"garbage")
    interrupted.max_train_steps = 4
    with pytest.raises(UserError, match=r"--resume: none of the 2 checkpoints in .* loads"):
        train(interrupted)


class Crash(Exception):
    pass


def _train_until(config: TrainConfig, stop_after: int):
    """Run `train` but stop it with an exception right after the checkpoint of `stop_after`, like a crash."""
    import dreambooth.train as training

    original = training.save_checkpoint

    def save_then_crash(*args, **kwargs):
        folder = original(*args, **kwargs)
        if args[2] == stop_after:
            raise Crash
        return folder

    training.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            train(config)
    finally:
        training.save_checkpoint = original
    from dreambooth.checkpoints import RunPaths

    return RunPaths(Path(config.output))


def test_prior_preservation_tops_up_class_images_and_logs_prior_loss(tiny_model, instance_dir, tmp_path):
    class_dir = tmp_path / "cats"
    write_images(class_dir, 1, seed=7, prefix="mine")
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", class_dir=str(class_dir),
                              class_prompt="a photo of a cat", num_class_images=3, class_image_steps=2))
    assert len(list(class_dir.glob("*.png"))) == 3 and (class_dir / "mine00.png").exists()
    record = json.loads(paths.metrics.read_text().splitlines()[0])
    assert record["loss"] == pytest.approx(record["instance_loss"] + record["prior_loss"], rel=1e-5)


def test_only_the_identifiers_embeddings_learn_and_at_their_own_rate(tiny_model, instance_dir, tmp_path):
    from transformers import CLIPTokenizer

    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", train_text_encoder=True, identifier="miru",
                              text_encoder_learning_rate=1e-6, token_embedding_learning_rate=1e-2))
    (key,) = [k for k in weights(tiny_model, "text_encoder") if k.endswith("token_embedding.weight")]
    before, after = weights(tiny_model, "text_encoder")[key], weights(paths.pipeline, "text_encoder")[key]
    miru = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")("miru", add_special_tokens=False).input_ids
    changed = [row for row in range(before.shape[0]) if not torch.equal(before[row], after[row])]
    assert changed == sorted(set(miru))  # "a", "photo", "of", "cat" and every absent word stay bit-identical
    assert (after - before)[changed].abs().max().item() > 1e-3  # steps of 1e-2, not the layers' 1e-6


def write_masks(instance_dir: Path, folder: Path, value: int) -> Path:
    folder.mkdir()
    for photo in instance_dir.glob("*.png"):
        Image.new("L", Image.open(photo).size, value).save(folder / photo.name)
    return folder


def test_masks_reach_the_loss(tiny_model, instance_dir, tmp_path):
    plain = train(make_config(tiny_model, instance_dir, tmp_path / "plain"))
    whole = train(make_config(tiny_model, instance_dir, tmp_path / "whole",
                              instance_mask_dir=str(write_masks(instance_dir, tmp_path / "white", 255))))
    nothing = train(make_config(tiny_model, instance_dir, tmp_path / "nothing", mask_background_weight=0.0,
                                adam_weight_decay=0.0,
                                instance_mask_dir=str(write_masks(instance_dir, tmp_path / "black", 0))))
    losses = [json.loads(p.metrics.read_text().splitlines()[0])["loss"] for p in (plain, whole, nothing)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # a mask over everything changes nothing
    assert losses[2] == 0.0  # no subject and no background weight: nothing left to learn
    assert max_difference(weights(plain.pipeline, "unet"), weights(whole.pipeline, "unet")) < 1e-5
    assert max_difference(weights(tiny_model, "unet"), weights(nothing.pipeline, "unet")) == 0.0


def test_v_prediction_model_trains(tiny_vpred_model, instance_dir, tmp_path):
    paths = train(make_config(tiny_vpred_model, instance_dir, tmp_path / "run", max_train_steps=1, snr_gamma=5.0))
    assert yaml.safe_load(paths.config.read_text())["_run"]["prediction_type"] == "v_prediction"


def test_output_holding_another_run_is_refused_then_moved_aside(tiny_model, instance_dir, tmp_path):
    config = make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1)
    train(config)
    with pytest.raises(UserError, match="already holds a run"):
        train(config)
    config.overwrite = True
    train(config)
    (moved,) = (tmp_path / "run").glob("replaced-*")
    assert (moved / "pipeline" / "model_index.json").is_file() and (moved / "metrics.jsonl").is_file()


def test_overwrite_over_a_folder_of_someone_elses_files_moves_every_one_aside_untouched(tiny_model, instance_dir,
                                                                                       tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    theirs = {"README.md": b"# my notes\n", "metrics.jsonl": b"not ours\n", "photo.bin": bytes(range(256))}
    for name, data in theirs.items():
        (folder / name).write_bytes(data)
    with pytest.raises(UserError, match="not a dreambooth run .* or pass --overwrite"):
        train(make_config(tiny_model, instance_dir, folder, max_train_steps=1))
    paths = train(make_config(tiny_model, instance_dir, folder, max_train_steps=1, overwrite=True))
    (moved,) = folder.glob("replaced-*")
    assert {path.name: path.read_bytes() for path in moved.iterdir()} == theirs  # byte for byte, nothing lost
    assert len(paths.metrics.read_text().splitlines()) == 1 and "my notes" not in paths.model_card.read_text()


def test_one_writer_per_run_folder_and_a_dead_writers_lock_is_taken_over(tiny_model, instance_dir, tmp_path,
                                                                           capsys):
    import os
    import signal
    import subprocess

    folder = tmp_path / "run"
    writer = subprocess.Popen([sys.executable, "-m", "dreambooth", "train", "--model", str(tiny_model),
                               "--instance-dir", str(instance_dir), "--instance-prompt", "a photo of miru cat",
                               "--resolution", str(TINY_RESOLUTION), "--max-train-steps", "100000",
                               "--output", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ((folder / ".dreambooth.lock").is_file() and (folder / ".dreambooth.lock").read_text()):
            assert time.monotonic() < deadline and writer.poll() is None, "the first train never took the lock"
            time.sleep(0.2)
        with pytest.raises(UserError, match=rf"--output .*: process {writer.pid} on .* is writing it"):
            train(make_config(tiny_model, instance_dir, folder, max_train_steps=1, overwrite=True))
    finally:
        writer.send_signal(signal.SIGKILL)  # dies holding the lock: the system releases it, the note stays
        writer.wait()
    capsys.readouterr()
    paths = train(make_config(tiny_model, instance_dir, folder, max_train_steps=1, overwrite=True))
    assert f"process {writer.pid} on" in capsys.readouterr().err  # "... stopped without releasing it; taking over"
    assert len(paths.metrics.read_text().splitlines()) == 1
    assert not (folder / ".dreambooth.lock").exists()  # released when the run ended


def test_resume_with_other_settings_is_refused(tiny_model, instance_dir, tmp_path):
    train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1))
    with pytest.raises(UserError, match="learning_rate"):
        train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2, resume=True,
                          learning_rate=1e-4))


def test_resume_goes_by_what_paths_name_and_follows_a_moved_run(tiny_model, instance_dir, tmp_path, monkeypatch):
    """The same folder spelled otherwise (relative, then absolute with a slash) and a run folder moved elsewhere resume;
    the moved run ends bit for bit where an uninterrupted one does."""
    import shutil

    straight = train(make_config(tiny_model, instance_dir, tmp_path / "straight", max_train_steps=3))
    monkeypatch.chdir(instance_dir.parent)
    first = make_config(tiny_model, Path(instance_dir.name), Path("run"), max_train_steps=3, checkpoint_every=1)
    _train_until(first, stop_after=2)
    shutil.move("run", tmp_path / "moved")
    resumed = train(make_config(tiny_model, f"{instance_dir}/", tmp_path / "moved", max_train_steps=3,
                                checkpoint_every=1, resume=True))  # absolute, with a slash, where it was relative
    assert max_difference(weights(straight.pipeline, "unet"), weights(resumed.pipeline, "unet")) == 0.0
    records = [json.loads(line) for line in resumed.metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_a_gpu_is_refused_before_anything_is_written(tiny_model, instance_dir, tmp_path):
    with pytest.raises(UserError, match="--mixed-precision fp16 needs a GPU"):
        train(make_config(tiny_model, instance_dir, tmp_path / "fp16", mixed_precision="fp16"))
    assert not (tmp_path / "fp16").exists()


@pytest.mark.parametrize(("name", "package"), [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt"),
                                               ("lion", "lion_pytorch")])
def test_a_missing_optimizer_package_is_refused_before_anything_is_written(name, package, tiny_model, instance_dir,
                                                                           tmp_path, monkeypatch):
    for module in [package] + [name for name in sys.modules if name.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, module, None)  # what an environment without it gives: ImportError
    with pytest.raises(UserError, match=rf"--optimizer {name} needs .* \(pip install \"dreambooth\[(gpu|optimizers)\]"):
        train(make_config(tiny_model, instance_dir, tmp_path / name, optimizer=name))
    assert not (tmp_path / name).exists()


# Losses of the first three steps of `test_expected_losses_of_three_steps`'s run, recorded from this code
# (torch 2.13.0, CPU, float32). Step 1 is checked independently: test_train_settings computes each first-step
# loss by hand from the papers' formulas. Steps 2 and 3 then pin down the updates in between (optimizer, rates,
# clipping, data order). A change that alters what training computes moves them: update them only when that
# is the intent, and say why in the commit.
EXPECTED_LOSSES = [
    {"loss": 2.2045278549194336, "instance_loss": 1.1078672409057617, "prior_loss": 1.0966607332229614},
    {"loss": 1.9756348133087158, "instance_loss": 0.9990226030349731, "prior_loss": 0.9766121506690979},
    {"loss": 1.0030187368392944, "instance_loss": 0.7649843692779541, "prior_loss": 0.2380344122648239},
]


def test_expected_losses_of_three_steps(tiny_model, instance_dir, tmp_path):
    class_dir = tmp_path / "cats"
    write_images(class_dir, 2, seed=9, prefix="cat")
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=3, train_batch_size=2,
                              class_dir=str(class_dir), class_prompt="a photo of a cat", num_class_images=2,
                              train_text_encoder=True, text_encoder_learning_rate=1e-4, offset_noise=0.05,
                              snr_gamma=5.0, lr_scheduler="linear", random_flip=True))
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    measured = [{key: record[key] for key in ("loss", "instance_loss", "prior_loss")} for record in records]
    for got, expected in zip(measured, EXPECTED_LOSSES, strict=True):
        assert got == pytest.approx(expected, rel=1e-5)


def test_processes_and_micro_batches_of_a_step_see_each_sample_once():
    """On 2 processes with 2 micro-batches of 3, step s uses sample ids 12(s-1) .. 12s-1, each exactly once."""
    from types import SimpleNamespace

    config = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", train_batch_size=3,
                         gradient_accumulation_steps=2)
    for step in (1, 2, 5):
        seen = []
        for process in (0, 1):
            accelerator = SimpleNamespace(num_processes=2, process_index=process)
            for micro_step in (0, 1):
                ids = sample_ids(step, micro_step, config, accelerator)
                assert ids == list(range(ids[0], ids[0] + 3))
                seen += ids
        assert sorted(seen) == list(range(12 * (step - 1), 12 * step))
    first = [sample_ids(1, 0, config, SimpleNamespace(num_processes=2, process_index=p))[0] for p in (0, 1)]
    assert first == [0, 3]  # micro-batch 0 of every process first, then micro-batch 1


def test_every_process_and_micro_batch_draws_its_own_noise():
    draws = {(step, micro, process): torch.randn(4, generator=step_generator(3, step, micro, process))
             for step in (1, 2) for micro in (0, 1) for process in (0, 1)}
    assert len({tuple(draw.tolist()) for draw in draws.values()}) == 8
    assert torch.equal(draws[(2, 1, 0)], torch.randn(4, generator=step_generator(3, 2, 1, 0)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_on_two_processes_the_schedule_follows_the_optimizer_steps(schedule):
    """accelerate steps the schedule once per process at each optimizer step: the rates per optimizer step
    must be those of one process."""
    def rates(num_processes: int) -> list[float]:
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        config = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", lr_scheduler=schedule,
                             lr_warmup_steps=2, max_train_steps=6)
        lr_schedule = learning_rate_schedule(optimizer, config, num_processes)
        found = []
        for _ in range(6):
            found.append(lr_schedule.get_last_lr()[0])
            optimizer.step()
            for _ in range(num_processes):
                lr_schedule.step()
        return found

    assert rates(2) == pytest.approx(rates(1))
    assert rates(1)[:3] == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize("every, expected", [(0, [5]), (1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (3, [3, 5])])
def test_checkpoints_come_every_n_steps_and_at_the_last(every, expected):
    config = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", max_train_steps=5,
                         checkpoint_every=every)
    assert [step for step in range(1, 6) if needs_checkpoint(step, config)] == expected


@pytest.mark.parametrize("prompts, every, expected", [([], 2, []), (["p"], 0, [5]), (["p"], 1, [1, 2, 3, 4, 5]),
                                                      (["p"], 2, [2, 4, 5])])
def test_validation_images_come_every_n_steps_and_at_the_end(prompts, every, expected):
    config = TrainConfig(model="m", instance_dir="i", instance_prompt="p", output="o", max_train_steps=5,
                         validation_prompt=prompts, validation_every=every)
    assert [step for step in range(1, 6) if needs_validation(step, config)] == expected


def test_validation_images_are_what_generate_renders_from_the_saved_model(tiny_model, instance_dir, tmp_path):
    """The last step's validation image equals a render of the finished pipeline with DDIM, the run's
    validation sampling steps, guidance 7.5 and the same seed."""
    import numpy as np

    from dreambooth.models import load_pipeline
    from dreambooth.sampling import SamplingSetting, render

    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1,
                              validation_prompt=["a photo of miru cat"], validation_seeds=[5],
                              validation_sampling_steps=3))
    (image,) = paths.validation_step(1).glob("*.png")
    assert f"Model: {tiny_model.parent.name}" in Image.open(image).text["parameters"]  # A1111's short model name
    pipeline = load_pipeline(str(paths.pipeline), torch_dtype=torch.float32)
    (expected,) = render(pipeline, ["a photo of miru cat"], [5], SamplingSetting(3, 7.5, "ddim"),
                         height=TINY_RESOLUTION, width=TINY_RESOLUTION)
    difference = np.abs(np.asarray(Image.open(image), dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1  # the same pixels, up to rounding


def test_resume_without_a_checkpoint_starts_at_step_one_and_drops_the_old_metric_lines(tiny_model, instance_dir,
                                                                                      tmp_path):
    import shutil

    train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as a run killed before its first checkpoint leaves it
    started = time.monotonic()
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2, resume=True))
    wall = time.monotonic() - started
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert 0 < records[0]["seconds"] < records[1]["seconds"] <= wall  # no time carried over from nothing


def test_a_finished_run_extends_from_its_last_step(tiny_model, instance_dir, tmp_path):
    straight = train(make_config(tiny_model, instance_dir, tmp_path / "straight", max_train_steps=3))
    train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2, checkpoint_minutes=1e-9,
                      keep_checkpoints=5))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    extended = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=3, resume=True))
    assert max_difference(weights(straight.pipeline, "unet"), weights(extended.pipeline, "unet")) == 0.0
    assert [json.loads(line)["step"] for line in extended.metrics.read_text().splitlines()] == [1, 2, 3]


def poison_step(monkeypatch, poisoned_step: int) -> None:
    """Make the loss of one step NaN, as an fp16 overflow or a bad batch does."""
    import dataclasses

    import dreambooth.train as training

    original, calls = training.micro_batch_loss, []

    def loss(*args, **kwargs):
        parts = original(*args, **kwargs)
        calls.append(1)
        return dataclasses.replace(parts, loss=parts.loss * float("nan")) if len(calls) == poisoned_step else parts

    monkeypatch.setattr(training, "micro_batch_loss", loss)


def test_on_nan_skip_leaves_the_update_out_and_counts_it(tiny_model, instance_dir, tmp_path, monkeypatch):
    poison_step(monkeypatch, 2)
    paths = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=4, on_nan="skip",
                              checkpoint_every=1, keep_checkpoints=4))
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]  # valid JSON throughout
    assert [(r["step"], r.get("skipped", False), r.get("skipped_steps", 0)) for r in records] == [
        (1, False, 0), (2, True, 1), (3, False, 1), (4, False, 1)]
    assert records[1]["loss"] is None and all(math.isfinite(r["loss"]) for r in records if r["step"] != 2)
    one, two = (weights(paths.checkpoint(step), "") for step in (1, 2))
    assert max_difference(one, two) == 0.0  # step 2 changed nothing
    assert max_difference(two, weights(paths.checkpoint(3), "")) > 0  # and training went on
    assert all(torch.isfinite(tensor).all() for tensor in weights(paths.pipeline, "unet").values())
    assert "1 updates with a non-finite loss or gradient were skipped" in paths.model_card.read_text()

    poison_step(monkeypatch, 2)
    with pytest.raises(UserError, match=r"^step 2: the loss is nan, training stopped .* or --on-nan skip$"):
        train(make_config(tiny_model, instance_dir, tmp_path / "stops", max_train_steps=4))


def test_a_resolution_too_small_for_the_vae_is_refused_before_anything_is_written(tiny_model, instance_dir, tmp_path):
    with pytest.raises(UserError, match=r"^--resolution 8: the latents would be 4x4 \(the VAE shrinks images 2x\)"):
        train(make_config(tiny_model, instance_dir, tmp_path / "run", resolution=8))
    assert not (tmp_path / "run").exists()


def test_a_class_folder_another_process_fills_is_named_by_its_flag(tiny_model, instance_dir, tmp_path):
    from dreambooth.files import folder_lock

    with folder_lock(tmp_path / "class"), pytest.raises(UserError, match=r"^--class-dir .*class: process \d+ on"):
        train(make_config(tiny_model, instance_dir, tmp_path / "run", class_dir=str(tmp_path / "class"),
                          class_prompt="a photo of a cat", num_class_images=2))


def test_train_warns_about_the_images_as_inspect_data_does(tiny_model, tmp_path, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    Image.effect_noise((16, 16), 60).convert("RGB").save(folder / "tiny.png")  # half the resolution
    train(make_config(tiny_model, folder, tmp_path / "run", max_train_steps=1))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "tiny.png" in warnings[0] and "upscaled" in warnings[0], warnings
