"""Settings: file + flags merge, unknown keys and wrong types are refused by name."""

import pytest

from dreambooth.config import ClassImagesConfig, EvaluateConfig, GenerateConfig, ReportConfig, TrainConfig
from dreambooth.errors import UserError
from dreambooth.options import build_config, load_config_file, to_dict

REQUIRED = {"model": "m", "instance_dir": "d", "instance_prompt": "a photo of miru cat", "output": "run"}


def test_flags_override_file_and_defaults_fill_the_rest():
    config = build_config(TrainConfig, {**REQUIRED, "learning_rate": 1e-6, "max_train_steps": 50},
                          {"max_train_steps": 9})
    assert config.learning_rate == 1e-6 and config.max_train_steps == 9 and config.resolution is None  # native size


def test_yaml_and_toml_files_load(tmp_path):
    (tmp_path / "a.yaml").write_text("model: m\nlearning_rate: 3e-6\nvalidation_prompt: [a, b]\n")
    (tmp_path / "b.toml").write_text('model = "m"\nlearning_rate = 3e-6\n')
    assert load_config_file(tmp_path / "a.yaml")["validation_prompt"] == ["a", "b"]
    assert load_config_file(tmp_path / "b.toml")["learning_rate"] == 3e-6
    # YAML 1.1 reads 3e-6 (no dot) as a string; it still becomes a float.
    config = build_config(TrainConfig, {**REQUIRED, **load_config_file(tmp_path / "a.yaml")}, {})
    assert config.learning_rate == 3e-6


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": 1}, "unknown key 'lr'"),
        ({"resolution": "big"}, "key 'resolution': expected int"),
        ({"train_text_encoder": "yes"}, "expected bool"),
        ({"resolution": 500}, "--resolution 500: must be a multiple of 8"),
        ({"learning_rate": 0}, "--learning-rate 0"),
        ({"max_train_steps": -1}, "--max-train-steps -1"),
        ({"class_dir": "cats"}, "--class-dir needs --class-prompt"),
        ({"lr_scheduler": "step"}, "choose one of"),
        ({"token_embedding_learning_rate": 1e-3}, "--token-embedding-learning-rate needs --train-text-encoder"),
        ({"token_embedding_learning_rate": 1e-3, "train_text_encoder": True}, "needs --identifier WORD"),
        ({"mask_background_weight": 1.5}, "--mask-background-weight 1.5: must be between 0 and 1"),
        ({"validation_steps": 5}, "key 'validation_steps': --validation-steps is now --validation-sampling-steps"),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(UserError, match=message):
        build_config(TrainConfig, {**REQUIRED, **values}, {})


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (TrainConfig, {"instance_prompt": ""}, "--instance-prompt '': must not be empty$"),
        (TrainConfig, {"instance_prompt": "\t "}, r"--instance-prompt '\\t ': must not be empty$"),
        (TrainConfig, {"class_prompt": " ", "class_dir": "cats"},
         "--class-prompt ' ': must not be empty; leave the flag out instead$"),
        (TrainConfig, {"class_prompt": ""}, "--class-prompt '': must not be empty"),
        (TrainConfig, {"identifier": ""}, "--identifier '': must not be empty"),
        (TrainConfig, {"validation_prompt": ["a photo of miru cat", ""]},
         "--validation-prompt '': must not be empty; drop the empty one$"),
        (TrainConfig, {"output": ""}, "--output '': must not be empty$"),  # the current folder, by accident
        (GenerateConfig, {"prompt": ["a cat", " "]}, "--prompt ' ': must not be empty; drop the empty one$"),
        (GenerateConfig, {"prompt": []}, "--prompt: give at least one value"),
        (ClassImagesConfig, {"prompt": ""}, "--prompt '': must not be empty$"),
        (EvaluateConfig, {"class_prompt": ""}, "--class-prompt '': must not be empty"),
        (ReportConfig, {"prompt": " "}, "--prompt ' ': must not be empty"),
    ],
)
def test_an_empty_prompt_or_path_is_refused_naming_the_flag(cls, values, message):
    required = {TrainConfig: REQUIRED, GenerateConfig: {"model": "m", "prompt": "p", "output": "o"},
                ClassImagesConfig: {"model": "m", "prompt": "p", "output": "o"},
                EvaluateConfig: {"samples": "s", "reference_dir": "r"}, ReportConfig: {"directory": "d"}}[cls]
    with pytest.raises(UserError, match=message):
        build_config(cls, {**required, **values}, {})


def test_an_empty_negative_prompt_is_the_default_and_allowed():
    assert build_config(GenerateConfig, {"model": "m", "prompt": "p", "output": "o", "negative_prompt": ""},
                        {}).negative_prompt == ""


def test_missing_required_setting_names_the_flag():
    with pytest.raises(UserError, match="missing --instance-prompt"):
        build_config(TrainConfig, {"model": "m", "instance_dir": "d", "output": "o"}, {})


def test_bad_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="no such file"):
        load_config_file(tmp_path / "missing.yaml")


def test_generate_lists_and_round_trip():
    config = build_config(GenerateConfig, {"model": "m", "prompt": "one prompt", "output": "o", "steps": [30, 50]}, {})
    assert config.prompt == ["one prompt"] and config.steps == [30, 50]
    assert build_config(GenerateConfig, to_dict(config), {}) == config


@pytest.mark.parametrize("flag", ["instance_dir", "class_dir"])
def test_the_run_folder_cannot_hold_the_runs_own_images(flag, tmp_path):
    images = {"instance_dir": str(tmp_path / "inst"), "class_dir": str(tmp_path / "class"), flag: str(tmp_path) + "/"}
    with pytest.raises(UserError, match=rf"^--{flag.replace('_', '-')} .*: is the --output run folder"):
        TrainConfig(model="m", instance_prompt="p", class_prompt="a cat", output=str(tmp_path), **images)
