"""Tracking: TensorBoard's events (and wandb's offline run) hold what metrics.jsonl holds, step by step."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.errors import UserError
from dreambooth.tracking import (STEP_SCALARS, STEPS_PER_SECOND, RunTracking, log_trial, scalar_config, started,
                                 trial_summary)
from dreambooth.train import train

from conftest import write_images
from test_train import make_config


def events(folder: Path):
    """TensorBoard's own reader over a run folder, purging what a restarted writer hides (as TensorBoard does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold: each metrics.jsonl number at its step, steps per second from `seconds`."""
    expected: dict[str, list[tuple[int, float]]] = {}
    seconds = 0.0
    for record in records:
        for key, tag in STEP_SCALARS.items():
            if record.get(key) is not None:
                expected.setdefault(tag, []).append((record["step"], record[key]))
        expected.setdefault(STEPS_PER_SECOND, []).append((record["step"], 1 / (record["seconds"] - seconds)))
        seconds = record["seconds"]
    return expected


def logged_scalars(accumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def assert_same(logged: dict, expected: dict) -> None:
    assert sorted(logged) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        assert [value for _, value in logged[tag]] == pytest.approx([value for _, value in points], rel=1e-5), tag


def test_tensorboard_events_hold_every_step_of_metrics_jsonl_and_the_validation_images(tiny_model, instance_dir,
                                                                                     tmp_path):
    run = tmp_path / "run"
    train(make_config(tiny_model, instance_dir, run, max_train_steps=4, log_every=3, train_text_encoder=True,
                      text_encoder_learning_rate=5e-4, validation_prompt=["a photo of miru cat", "miru cat swims"],
                      validation_seeds=[0], validation_every=2, validation_sampling_steps=1))
    records = metric_lines(run)
    accumulator = events(run / "logs" / "dreambooth")
    assert_same(logged_scalars(accumulator), expected_scalars(records))
    assert {tag: len(points) for tag, points in logged_scalars(accumulator).items()} == {
        tag: 4 for tag in ("train/loss", "train/instance_loss", "train/lr", "train/text_encoder_lr", "train/grad_norm",
                           STEPS_PER_SECOND)}
    assert records[0]["text_encoder_lr"] == 5e-4 and records[0]["lr"] == 1e-3

    # The validation images are the PNGs of validation/, pixel for pixel, at their steps; the prompts beside them.
    for name in ("p0-seed0", "p1-seed0"):
        images = accumulator.Images(f"validation/{name}")
        assert [image.step for image in images] == [2, 4]
        for image in images:
            saved = Image.open(run / "validation" / f"step-{image.step:06d}" / f"{name}.png")
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), np.asarray(saved))
    prompts = accumulator.Tensors("validation/prompts/text_summary")
    assert [event.step for event in prompts] == [2, 4]
    assert prompts[0].tensor_proto.string_val[0].decode() == "p0: a photo of miru cat\n\np1: miru cat swims"
    # The resolved settings are the run's config: hparams (lists as JSON text) and the YAML in the Text tab.
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = HParamsPluginData.FromString(
        accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["max_train_steps"].number_value == 4 and hparams["_run.family"].string_value == "sd"
    assert json.loads(hparams["validation_prompt"].string_value) == ["a photo of miru cat", "miru cat swims"]
    config = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_train_steps: 4" in config and "family: sd" in config


def test_a_resumed_run_continues_its_tensorboard_run_with_each_step_once(tiny_model, instance_dir, tmp_path,
                                                                        monkeypatch):
    import dreambooth.train as training

    run = tmp_path / "run"
    write_images(tmp_path / "class", 2, seed=1)  # a full class folder: prior preservation without generating
    config = make_config(tiny_model, instance_dir, run, max_train_steps=4, checkpoint_every=2, log_every=1,
                         class_prompt="a photo of a cat", class_dir=str(tmp_path / "class"), num_class_images=2)
    # Killed after step 3 was logged: the resume goes back to the step-2 checkpoint and trains step 3 again.
    real = training.write_metrics

    def killed_after_step_3(pending, *args):
        result = real(pending, *args)
        if pending[-1][0] == 3:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(training, "write_metrics", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(training, "write_metrics", real)
    first = metric_lines(run)
    assert [r["step"] for r in first] == [1, 2, 3] and all(r["prior_loss"] for r in first)
    config.resume = True
    train(config)
    records = metric_lines(run)
    folder = run / "logs" / "dreambooth"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one folder, one file per start
    logged = logged_scalars(events(folder))
    assert set(logged) == {"train/loss", "train/instance_loss", "train/prior_loss", "train/lr", "train/grad_norm",
                           STEPS_PER_SECOND}
    assert_same({tag: points for tag, points in logged.items() if tag != STEPS_PER_SECOND},
                {tag: points for tag, points in expected_scalars(records).items() if tag != STEPS_PER_SECOND})
    # Steps per second after the resume count from the checkpoint's step and its training seconds.
    resumed_rate = 1 / (records[2]["seconds"] - records[1]["seconds"])
    assert [step for step, _ in logged[STEPS_PER_SECOND]] == [1, 2, 3, 4]
    assert logged[STEPS_PER_SECOND][2][1] == pytest.approx(resumed_rate, rel=1e-5)


def test_report_to_none_writes_no_logs_and_a_missing_tracker_fails_before_training(tiny_model, instance_dir,
                                                                                  tmp_path, monkeypatch):
    run = train(make_config(tiny_model, instance_dir, tmp_path / "quiet", max_train_steps=1, report_to="none")).root
    assert not (run / "logs").exists() and len(metric_lines(run)) == 1
    elsewhere = tmp_path / "board"
    run = train(make_config(tiny_model, instance_dir, tmp_path / "run", max_train_steps=1,
                            logging_dir=str(elsewhere), tracker_project="mine")).root
    assert not (run / "logs").exists() and list((elsewhere / "mine").glob("events.out.tfevents.*"))

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    for report_to in ("wandb", "all"):
        with pytest.raises(UserError, match=rf'^--report-to {report_to}: wandb is not installed; pip install '
                                            r'"dreambooth\[wandb\]", or choose another --report-to'):
            train(make_config(tiny_model, instance_dir, tmp_path / report_to, max_train_steps=1, report_to=report_to))
        assert not (tmp_path / report_to).exists()

    def refused():
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login()")

    with pytest.raises(UserError, match=r"^--report-to wandb: a tracker could not start \(api_key not configured "
                                        r"\(no-tty\)\); for wandb run `wandb login` or set WANDB_MODE=offline; "
                                        r"then go$"):
        started(refused, "wandb", "; then go")


def test_settings_become_flat_scalars_for_tensorboard():
    assert scalar_config({"lr": 1e-4, "prompts": ["a", "b"], "vae": None, "flag": True,
                          "_run": {"family": "sd"}}) == {"lr": 1e-4, "prompts": '["a", "b"]', "flag": True,
                                                         "_run.family": "sd"}


def metric_row(guidance: float, dino: float, trial: str = "t") -> dict:
    """A row of a sweep's metrics.jsonl (as metrics.evaluate_samples writes it), two images."""
    return {"trial": trial, "steps": 2, "guidance": guidance, "scheduler": "ddim", "prompt": "p", "n": 2,
            "dino": dino, "dino_se": 0.0, "clip_i": 0.5, "clip_i_se": 0.0, "clip_t": 0.25, "clip_t_se": 0.0,
            "pres": None, "pres_se": None, "div": 0.125, "div_se": 0.0}


def test_a_trials_summary_pools_its_rows_and_names_each_sampling_setting():
    row = metric_row
    one = trial_summary([row(3.0, 0.75)])
    assert one == {"DINO": 0.75, "CLIP-I": 0.5, "CLIP-T": 0.25, "DIV": 0.125}  # no PRES measured: left out
    two = trial_summary([row(3.0, 0.75), row(6.0, 0.25)])
    assert two["DINO"] == pytest.approx(0.5) and two["DINO/2 steps, guidance 6, ddim"] == 0.25


def test_a_sweep_trial_is_a_tensorboard_run_of_its_own_logged_once_and_again_when_its_metrics_change(
        tiny_model, instance_dir, tmp_path):
    sweep = tmp_path / "sweep"
    config = make_config(tiny_model, instance_dir, sweep / "runs" / "lr1")
    sweep.mkdir()
    (sweep / "metrics.jsonl").write_text(json.dumps(metric_row(3.0, 0.75, "lr1-steps2")) + "\n")
    for _ in range(2):  # a resumed sweep passes its finished trials again: logged once
        log_trial(config, sweep, sweep / "logs", "lr1-steps2", {"run": "lr1", "learning_rate": 1e-3}, 2)
    folder = sweep / "logs" / "lr1-steps2"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    (sweep / "metrics.jsonl").write_text(json.dumps(metric_row(3.0, 0.5, "lr1-steps2")) + "\n")  # evaluated again
    log_trial(config, sweep, sweep / "logs", "lr1-steps2", {"run": "lr1", "learning_rate": 1e-3}, 2)
    logged = events(folder)
    assert logged_scalars(logged) == {"trial/DINO": [(2, 0.5)], "trial/CLIP-I": [(2, 0.5)],
                                      "trial/CLIP-T": [(2, 0.25)], "trial/DIV": [(2, 0.125)]}
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = HParamsPluginData.FromString(
        logged.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in
            hparams.items()} == {"run": "lr1", "learning_rate": 1e-3, "step": 2}


# wandb -----------------------------------------------------------------------------------------------------------

def wandb_records(path: Path):
    """The records of an offline run's .wandb file (LevelDB's log format: 32 KiB blocks of chunks, each with a
    7-byte header; the file starts with wandb's own 7-byte header), as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, parts = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        parts += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_run(folder: Path, start: int = 0) -> dict:
    """An offline run's history (step -> values), summary, config, run and exit records, read back without a network
    (the `start`-th start of the run in `folder`: each start writes a file of its own)."""
    path = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))[start]
    history: dict[int, dict] = {}
    summary: dict = {}
    run = exit = None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            history.setdefault(values.pop("_step"), {}).update(values)
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "run":
            run = record.run
        elif kind == "exit":
            exit = record.exit
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    return {"history": history, "summary": summary, "config": config, "run": run, "exit": exit}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='wandb is an extra: pip install "dreambooth[wandb]"')
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_holds_the_same_history_config_and_images(offline_wandb, tiny_model, instance_dir,
                                                                    tmp_path):
    run = tmp_path / "run"
    train(make_config(tiny_model, instance_dir, run, max_train_steps=3, log_every=2, report_to="wandb",
                      validation_prompt=["a photo of miru cat"], validation_seeds=[0, 1], validation_every=2,
                      validation_sampling_steps=1))
    logged = wandb_run(run / "logs")
    expected = expected_scalars(metric_lines(run))
    for tag, points in expected.items():
        assert [(step, logged["history"][step][tag]) for step, _ in points] == pytest.approx(points, rel=1e-6)
    assert sorted(logged["history"]) == [1, 2, 3]
    for step in (2, 3):
        images = logged["history"][step]["validation/captions"]
        assert images == ["p0-seed0: a photo of miru cat", "p0-seed1: a photo of miru cat"]
    assert logged["config"]["max_train_steps"] == 3 and logged["config"]["run"]["family"] == "sd"
    assert logged["run"].display_name == "run" and logged["run"].job_type == "train"
    assert logged["run"].run_id == (run / "logs" / "wandb-run-id").read_text().strip()
    assert not (run / "logs" / "dreambooth").exists()  # wandb only: no TensorBoard events
    assert logged["exit"].exit_code == 0


def test_a_resumed_online_wandb_run_is_not_sent_the_steps_it_holds():
    """Online, a resumed wandb run knows its next step (offline it starts at 0, so this needs a stand-in run)."""
    from types import SimpleNamespace

    sent = []
    run = SimpleNamespace(name="wandb", tracker=SimpleNamespace(step=3),
                          log=lambda values, step: sent.append((step, values["train/loss"])))
    records = [{"step": step, "loss": step / 10, "seconds": step} for step in (2, 3, 4)]
    RunTracking([run], seconds_before=1.0).log_steps(records)
    assert sent == [(3, 0.3), (4, 0.4)]


def test_a_resumed_run_continues_its_wandb_run(offline_wandb, tiny_model, instance_dir, tmp_path, monkeypatch):
    import time

    import dreambooth.train as training

    run = tmp_path / "run"
    config = make_config(tiny_model, instance_dir, run, max_train_steps=3, checkpoint_every=1, report_to="wandb")
    real = training.save_checkpoint

    def killed_after_step_2(accelerator, paths, step, keep):
        real(accelerator, paths, step, keep)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(training, "save_checkpoint", real)
    time.sleep(1)  # offline, each start of a run writes a folder named by the second it started in
    config.resume = True
    train(config)
    first, resumed = wandb_run(run / "logs", 0), wandb_run(run / "logs", 1)
    assert first["exit"].exit_code == 1 and resumed["exit"].exit_code == 0  # the killed start shows as failed
    assert first["run"].run_id == resumed["run"].run_id and resumed["run"].resume
    assert sorted(first["history"]) == [1, 2] and sorted(resumed["history"]) == [3]
    expected = expected_scalars(metric_lines(run))
    assert resumed["history"][3]["train/loss"] == pytest.approx(expected["train/loss"][2][1], rel=1e-6)


def test_wandb_logs_a_sweep_trial_as_a_run_of_the_sweeps_group_with_its_metrics_as_summary(
        offline_wandb, tiny_model, instance_dir, tmp_path):
    sweep = tmp_path / "my-sweep"
    config = make_config(tiny_model, instance_dir, sweep / "runs" / "lr1", report_to="wandb", tracker_project="p")
    sweep.mkdir()
    rows = [metric_row(3.0, 0.75, "lr1-steps2"), metric_row(6.0, 0.25, "lr1-steps2"), metric_row(3.0, 0.0, "other")]
    (sweep / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    log_trial(config, sweep, sweep / "logs", "lr1-steps2", {"run": "lr1", "learning_rate": 1e-3}, 2)
    logged = wandb_run(sweep / "logs" / "lr1-steps2")
    assert {key: value for key, value in logged["summary"].items() if not key.startswith("_")} == pytest.approx(
        trial_summary(rows[:2]))
    assert logged["summary"]["DINO"] == pytest.approx(0.5)
    assert {key: value for key, value in logged["config"].items() if key != "_wandb"} == {
        "run": "lr1", "learning_rate": 1e-3, "step": 2}
    run = logged["run"]
    assert (run.project, run.run_group, run.job_type, run.display_name) == ("p", "my-sweep", "trial", "lr1-steps2")


def test_a_sweeps_training_runs_and_trials_share_its_wandb_group(offline_wandb, tiny_model, instance_dir, tmp_path):
    from dreambooth.config import SweepConfig
    from dreambooth.sweep import run_sweep

    from test_sweep import write_sweep

    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir, grid={"learning_rate": [1e-3]}, max_train_steps=1,
                             sampling={"steps": [1], "guidance": [3.0]}, seeds=[0], report_to="wandb")
    run_sweep(SweepConfig(sweep=str(sweep_file), output=str(tmp_path / "my-sweep")))
    logs = tmp_path / "my-sweep" / "logs"
    training, trial = wandb_run(logs / "runs" / "lr0.001"), wandb_run(logs / "lr0.001-steps1")
    assert (training["run"].run_group, training["run"].job_type, training["run"].display_name) == (
        "my-sweep", "train", "lr0.001")
    assert sorted(training["history"]) == [1]
    assert (trial["run"].run_group, trial["run"].job_type) == ("my-sweep", "trial")
