"""Sweeps: work sharing between trials, resuming after a kill, the files a sweep leaves."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

import dreambooth.sweep as sweeping
from dreambooth.config import GenerateConfig, SweepConfig
from dreambooth.errors import UserError
from dreambooth.files import append_jsonl, folder_lock
from dreambooth.interrupts import Stopped
from dreambooth.sweep import expand_trials, generate_config, load_sweep, run_sweep, train_config
from dreambooth.sweep_files import fill_prompt, plain_class_prompt, read_trial_records

from conftest import TINY_RESOLUTION


def write_sweep(tmp_path: Path, model: Path, instance_dir: Path, **extra) -> Path:
    sweep = {
        "model": str(model), "instance_dir": str(instance_dir), "instance_prompt": "a photo of miru cat",
        "resolution": TINY_RESOLUTION, "identifier": "miru", "class": "cat",
        "grid": {"learning_rate": [1e-4, 1e-3], "max_train_steps": [1, 2]},
        "sampling": {"steps": [2], "guidance": [3.0, 6.0], "scheduler": ["ddim"]},
        "prompts": ["a photo of {id} {class} by the sea"], "seeds": [0, 1],
        "evaluation": {"enabled": False},
    }
    sweep.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_grid_expands_to_trials_sharing_runs(tiny_model, instance_dir, tmp_path):
    trials = expand_trials(load_sweep(write_sweep(tmp_path, tiny_model, instance_dir)))
    assert [t.name for t in trials] == ["lr0.0001-steps1", "lr0.0001-steps2", "lr0.001-steps1", "lr0.001-steps2"]
    assert len({t.run for t in trials}) == 2


def test_bad_sweep_files_name_the_key(tiny_model, instance_dir, tmp_path):
    with pytest.raises(UserError, match="unknown key 'learning_rat'"):
        load_sweep(write_sweep(tmp_path, tiny_model, instance_dir, grid={"learning_rat": [1e-4]}))
    with pytest.raises(UserError, match="under `sampling:`"):
        load_sweep(write_sweep(tmp_path, tiny_model, instance_dir, sampling={"stepz": [2]}))
    with pytest.raises(UserError, match="--learning-rate"):
        load_sweep(write_sweep(tmp_path, tiny_model, instance_dir, grid={"learning_rate": [0.0]}))


def test_prompt_templates_fill_identifier_and_class():
    assert fill_prompt("a photo of {id} {class}, {id} again", "miru", "cat") == "a photo of miru cat, miru again"
    assert fill_prompt("no placeholders {other}", "miru", "cat") == "no placeholders {other}"
    assert plain_class_prompt("a photo of a white cat", "cat") == "a photo of a white cat"
    assert plain_class_prompt(None, "cat") == "a photo of a cat"
    assert plain_class_prompt(None, None) is None


def test_trial_records_keep_each_trials_newest_line(tmp_path):
    for record in ({"trial": "a", "status": "pending"}, {"trial": "b", "status": "pending"}, {"note": "no trial"},
                   {"trial": "a", "status": "done"}):
        append_jsonl(tmp_path / "trials.jsonl", record)
    assert read_trial_records(tmp_path) == {"a": {"trial": "a", "status": "done"},
                                            "b": {"trial": "b", "status": "pending"}}
    assert read_trial_records(tmp_path / "missing") == {}


def test_sweep_without_sampling_keys_samples_with_generate_defaults(tiny_model, instance_dir, tmp_path):
    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir)
    values = yaml.safe_load(sweep_file.read_text())
    del values["sampling"]
    sweep_file.write_text(yaml.safe_dump(values))
    sweep = load_sweep(sweep_file)
    config = generate_config(sweep, "some/pipeline", tmp_path / "samples")
    # Everything the file does not set is GenerateConfig's own default (steps, guidance, scheduler, size, batch).
    assert config == GenerateConfig(model="some/pipeline", prompt=["a photo of miru cat by the sea"],
                                    output=str(tmp_path / "samples"), seeds=[0, 1])


def test_sweep_sampling_keys_reach_generate_and_are_checked_before_training(tiny_model, instance_dir, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, tiny_model, instance_dir, sampling={"guidance": [4.0], "batch_size": 2}))
    config = generate_config(sweep, "p", tmp_path)
    defaults = GenerateConfig(model="p", prompt=["p"], output="o")
    assert (config.guidance, config.batch_size, config.steps) == ([4.0], 2, defaults.steps)
    with pytest.raises(UserError, match="--steps"):
        load_sweep(write_sweep(tmp_path, tiny_model, instance_dir, sampling={"steps": [0]}))


def test_sweep_identifier_is_also_the_training_identifier(tiny_model, instance_dir, tmp_path):
    """`identifier:` fills {id} and names the word whose embeddings learn; it is not hidden from training."""
    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir, identifier="miru", train_text_encoder=True,
                             token_embedding_learning_rate=1e-3, class_prompt="a photo of a cat",
                             grid={"prior_loss_weight": [0.0, 1.0]})
    # The trial without prior preservation has no class prompt to find the word by: only `identifier:` names it.
    sweep = load_sweep(sweep_file)
    configs = [train_config(sweep, trial, tmp_path) for trial in expand_trials(sweep)]
    assert [(c.class_prompt, c.identifier) for c in configs] == [(None, "miru"), ("a photo of a cat", "miru")]
    assert sweep.filled_prompts == ["a photo of miru cat by the sea"]


def test_two_rates_by_two_step_counts_train_exactly_two_runs_and_resume(tiny_model, instance_dir, tmp_path,
                                                                        monkeypatch):
    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir)
    output = tmp_path / "sweep"
    # First attempt: killed while sampling the third trial.
    real_sample = sweeping.sample_trial
    sampled: list[str] = []

    def sample_then_die(sweep, trial, pipeline, directory):
        if len(sampled) == 2:
            raise KeyboardInterrupt
        sampled.append(trial.name)
        return real_sample(sweep, trial, pipeline, directory)

    monkeypatch.setattr(sweeping, "sample_trial", sample_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepConfig(sweep=str(sweep_file), output=str(output)))
    statuses = [json.loads(line)["status"] for line in (output / "trials.jsonl").read_text().splitlines()]
    assert statuses == ["done", "done", "trained", "trained"]

    # Second attempt, same command: finished work is skipped (both runs were trained before the kill).
    monkeypatch.setattr(sweeping, "sample_trial", real_sample)
    import dreambooth.train as training

    trainings: list[str] = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda config, **options: trainings.append(config.output)
                        or real_train(config, **options))
    run_metrics = (output / "runs" / "lr0.0001" / "metrics.jsonl").read_text()
    first_grid = (output / "samples" / "lr0.0001-steps1" / "grid.png").stat().st_mtime_ns
    run_sweep(SweepConfig(sweep=str(sweep_file), output=str(output)))

    assert trainings == []
    assert sorted(p.name for p in (output / "runs").iterdir()) == ["lr0.0001", "lr0.001"]
    assert (output / "runs" / "lr0.0001" / "metrics.jsonl").read_text() == run_metrics  # not trained again
    assert (output / "samples" / "lr0.0001-steps1" / "grid.png").stat().st_mtime_ns == first_grid
    records = [json.loads(line) for line in (output / "trials.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"] * 4
    assert {r["run"] for r in records} == {"runs/lr0.0001", "runs/lr0.001"}
    assert (output / "runs" / "lr0.001" / "pipelines" / "step-000001" / "model_index.json").is_file()
    manifest = (output / "samples" / "lr0.001-steps2" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 2 * 2 * 1  # 2 guidance values x 2 seeds x 1 prompt (no class prompt: evaluation off)
    assert (output / "report.html").is_file() and (output / "report.md").is_file()


def test_shipped_seed_grid_is_a_valid_sweep(monkeypatch, tmp_path):
    """examples/seed-grid.yaml parses into the seed's four trials from two runs (the model is not loaded)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(root / "examples" / "seed-grid.yaml")
    trials = expand_trials(sweep)
    assert [t.name for t in trials] == ["lr1e-06-steps600", "lr1e-06-steps900", "lr3e-06-steps600", "lr3e-06-steps900"]
    assert len({t.run for t in trials}) == 2
    assert sweep.sampling["steps"] == [30, 50] and sweep.sampling["guidance"] == [6, 12]
    assert sweep.filled_prompts[0] == "a photo of miru cat by the sea"


def test_measured_sweep_shares_class_images_and_writes_metrics(tiny_model, instance_dir, clip_folder, dino_folder,
                                                               tmp_path):
    sweep_file = write_sweep(
        tmp_path, tiny_model, instance_dir, class_prompt="a photo of a cat", num_class_images=2, class_image_steps=2,
        grid={"prior_loss_weight": [0.0, 1.0], "learning_rate": [1e-3], "max_train_steps": [1]},
        sampling={"steps": [2], "guidance": [3.0]},
        evaluation={"clip_model": str(clip_folder), "dino_model": str(dino_folder)},
    )
    output = tmp_path / "sweep"
    run_sweep(SweepConfig(sweep=str(sweep_file), output=str(output)))

    (class_folder,) = (output / "class_images").iterdir()  # generated once, for the one run that uses it
    assert len(list(class_folder.glob("*.png"))) == 2
    without = yaml.safe_load((output / "runs" / "lr0.001-prior0" / "config.yaml").read_text())
    with_prior = yaml.safe_load((output / "runs" / "lr0.001-prior1" / "config.yaml").read_text())
    assert without["class_prompt"] is None and with_prior["class_dir"] == str(class_folder)
    # The runs share one latent folder (a subfolder per VAE): the class images' latents and the photos' crops.
    assert without["latent_cache_dir"] == with_prior["latent_cache_dir"] == str(output / "latent_cache")
    assert len(list((output / "latent_cache").glob("*/*.safetensors"))) >= 2 + 1
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["trial"] for row in rows) == ["lr0.001-prior0-steps1", "lr0.001-prior1-steps1"]
    for row in rows:
        assert row["prompt"] == "a photo of miru cat by the sea" and row["n"] == 2
        assert -1 <= row["dino"] <= 1 and -1 <= row["clip_t"] <= 1 and row["pres"] is not None
    samples = [json.loads(line)["prompt"] for line in
               (output / "samples" / "lr0.001-prior1-steps1" / "manifest.jsonl").read_text().splitlines()]
    assert samples.count("a photo of a cat") == 2  # the class prompt was rendered for PRES
    assert "lr0.001-prior1-steps1" in (output / "report.md").read_text()
    # TensorBoard (the default tracker): each trial a run of its own under SWEEP/logs, its metrics at its step.
    from dreambooth.tracking import trial_summary
    from test_tracking import events

    for trial in ("lr0.001-prior0-steps1", "lr0.001-prior1-steps1"):
        logged = events(output / "logs" / trial)
        summary = trial_summary([row for row in rows if row["trial"] == trial])
        assert {tag: [(e.step, e.value) for e in logged.Scalars(tag)] for tag in logged.Tags()["scalars"]} == {
            f"trial/{name}": [(1, pytest.approx(value, rel=1e-6))] for name, value in summary.items()}
        assert {"DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"} <= set(summary)
    assert list((output / "logs" / "runs" / "lr0.001-prior1" / "dreambooth").glob("events.out.tfevents.*"))


def test_devices_run_training_runs_side_by_side_in_worker_processes(tiny_model, instance_dir, tmp_path):
    """Two 'devices' (CUDA_VISIBLE_DEVICES values; on a CPU machine they only name the workers)."""
    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir, grid={"learning_rate": [1e-4, 1e-3]},
                             max_train_steps=1, sampling={"steps": [2], "guidance": [3.0]}, seeds=[0])
    output = tmp_path / "sweep"
    run_sweep(SweepConfig(sweep=str(sweep_file), output=str(output), devices=["0", "1"]))
    records = [json.loads(line) for line in (output / "trials.jsonl").read_text().splitlines()]
    assert [(r["trial"], r["status"]) for r in records] == [("lr0.0001-steps1", "done"), ("lr0.001-steps1", "done")]
    for trial in ("lr0.0001-steps1", "lr0.001-steps1"):
        assert (output / "samples" / trial / "grid.png").is_file()
    assert (output / "report.html").is_file()


def test_shipped_miniworld_sweep_is_a_valid_sweep(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    trials = expand_trials(load_sweep(root / "examples" / "miniworld-sweep.yaml"))
    assert len(trials) == 4 and len({t.run for t in trials}) == 2


def test_a_grid_over_lora_rank_trains_lora_runs_samples_them_and_skips_them_when_done(tiny_model, instance_dir,
                                                                                       tmp_path, monkeypatch):
    from dreambooth.lora import is_lora_folder

    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir,
                             grid={"lora_rank": [2, 4], "max_train_steps": [1, 2]}, seeds=[0])
    output = tmp_path / "sweep"
    run_sweep(SweepConfig(sweep=str(sweep_file), output=str(output)))
    runs = sorted(p.name for p in (output / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        root = output / "runs" / run
        assert is_lora_folder(root / "lora") and is_lora_folder(root / "pipelines" / "step-000001")
        assert not (root / "pipeline").exists()
        assert yaml.safe_load((root / "config.yaml").read_text())["learning_rate"] == 1e-4  # LoRA's default
    manifests = sorted((output / "samples").glob("*/manifest.jsonl"))
    assert len(manifests) == 4 and all(len(m.read_text().splitlines()) == 2 for m in manifests)
    import dreambooth.train as training

    monkeypatch.setattr(training, "train", lambda config, **_: pytest.fail(f"{config.output} trained again"))
    run_sweep(SweepConfig(sweep=str(sweep_file), output=str(output)))


def trial_statuses(output: Path) -> list[str]:
    return [record["status"] for record in read_trial_records(output).values()]


def test_a_stopped_sweep_lets_the_folder_go_and_the_same_command_continues(tiny_model, instance_dir, tmp_path,
                                                                            monkeypatch):
    import dreambooth.train as training

    sweep_file = write_sweep(tmp_path, tiny_model, instance_dir, grid={"max_train_steps": [1, 2]}, seeds=[0],
                             sampling={"steps": [1], "guidance": [3.0]})
    config = SweepConfig(sweep=str(sweep_file), output=str(tmp_path / "sweep"))
    output = tmp_path / "sweep"

    # Training that stops on a signal (after its checkpoint) stops the sweep; the trials are not "failed".
    def stopped_training(config, **_):
        raise Stopped(signal.SIGTERM, "stopped after step 1 (SIGTERM); run the same command again to resume")

    real_train = training.train
    monkeypatch.setattr(training, "train", stopped_training)
    with pytest.raises(Stopped, match="after step 1"):
        run_sweep(config)
    assert trial_statuses(output) == ["pending", "pending"] and not (output / ".dreambooth.lock").exists()

    # SIGTERM while the first trial is sampled: that trial is finished, then the sweep stops.
    monkeypatch.setattr(training, "train", real_train)
    real_sample = sweeping.sample_trial

    def sample_then_signal(*args):
        samples = real_sample(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only asks to stop
        return samples

    monkeypatch.setattr(sweeping, "sample_trial", sample_then_signal)
    with pytest.raises(Stopped, match=r"^stopped after 1 of 2 trials \(SIGTERM\); run the same command again to "
                                      r"continue$") as stop:
        run_sweep(config)
    assert stop.value.exit_status == 128 + signal.SIGTERM
    assert trial_statuses(output) == ["done", "trained"] and not (output / ".dreambooth.lock").exists()
    first_grid = (output / "samples" / "run-steps1" / "grid.png").read_bytes()

    # The same command: nothing trained or sampled twice.
    monkeypatch.setattr(sweeping, "sample_trial", real_sample)
    monkeypatch.setattr(training, "train", lambda config, **_: pytest.fail(f"{config.output} trained again"))
    run_sweep(config)
    assert trial_statuses(output) == ["done", "done"] and (output / "report.html").is_file()
    assert (output / "samples" / "run-steps1" / "grid.png").read_bytes() == first_grid


def test_a_sweep_refuses_a_folder_being_written_or_holding_files_of_others(tiny_model, instance_dir, tmp_path):
    config = SweepConfig(sweep=str(write_sweep(tmp_path, tiny_model, instance_dir)), output=str(tmp_path / "sweep"))
    with folder_lock(tmp_path / "sweep"):  # as another sweep holding it would
        with pytest.raises(UserError, match=rf"^--output {tmp_path / 'sweep'}: process {os.getpid()} on .* is "
                                            "writing it"):
            run_sweep(config)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "report.md").write_text("my notes")
    with pytest.raises(UserError, match=r"holds report.md, which no sweep wrote; pick a new or empty folder$"):
        run_sweep(config)
    assert [(p.name, p.read_text()) for p in (tmp_path / "sweep").iterdir()] == [("report.md", "my notes")]
    (tmp_path / "board" / "logs").mkdir(parents=True)  # the trackers' folder is a sweep's too
    with pytest.raises(UserError, match=r"holds logs, which no sweep wrote"):
        run_sweep(SweepConfig(sweep=config.sweep, output=str(tmp_path / "board")))
