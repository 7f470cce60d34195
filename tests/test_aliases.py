"""Named models: aliases resolve to their folders, unknown names fall through, missing weights are one line."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from dreambooth import aliases
from dreambooth.aliases import model_alias_folder, register_embedding_alias, register_model_alias
from dreambooth.errors import UserError
from dreambooth.models import load_components, resolve_model


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts from an empty registry whose plugins have not been loaded yet."""
    monkeypatch.setattr(aliases, "_ALIASES", {})
    monkeypatch.setattr(aliases, "_plugins_loaded", False)


def test_a_model_alias_resolves_to_its_folder_and_loads(tiny_model):
    register_model_alias("tiny-sd", lambda: tiny_model)
    source = resolve_model("tiny-sd")
    assert (source.kind, source.location, source.family) == ("folder", str(tiny_model), "sd")
    assert source.requested == "tiny-sd"
    assert load_components("tiny-sd").unet.config.cross_attention_dim == 32


def test_an_embedding_alias_serves_as_clip_and_dino(clip_folder):
    from dreambooth.metrics import load_embedding_models

    register_embedding_alias("tiny-clip", lambda: clip_folder)
    models = load_embedding_models("tiny-clip", "tiny-clip", device="cpu")
    assert models.dino_is_clip and models.dino is models.clip
    assert models.clip.config.projection_dim == 16


def test_unknown_names_fall_through_to_paths_and_hub_ids(tiny_model):
    register_model_alias("tiny-sd", lambda: tiny_model)
    assert model_alias_folder("not-registered") is None
    assert aliases.embedding_alias_folder("tiny-sd") is None  # a model alias is no embedding alias
    assert resolve_model(str(tiny_model)).location == str(tiny_model)
    with pytest.raises(UserError, match="offline"):
        resolve_model("nobody-here/no-such-model")


def test_an_alias_whose_weights_are_missing_is_one_line_naming_the_flag(tmp_path, clip_folder):
    from dreambooth.metrics import load_embedding_models

    register_model_alias("gone", lambda: tmp_path / "never-built", "a model nobody built")
    register_embedding_alias("gone", lambda: tmp_path / "never-built")
    with pytest.raises(UserError) as model_error:
        resolve_model("gone")
    message = str(model_error.value)
    assert "\n" not in message and message.startswith("--model gone (a model nobody built)")
    assert "model_index.json" in message and "not installed" in message
    with pytest.raises(UserError, match=r"^--dino-model gone: its weights are not installed \(no config.json"):
        load_embedding_models(str(clip_folder), "gone", device="cpu")


def test_a_direct_registration_wins_over_a_plugin_of_the_same_name(tiny_model):
    register_model_alias("miniworld", lambda: tiny_model)  # loads the plugins first, then replaces theirs
    assert resolve_model("miniworld").location == str(tiny_model)


def test_a_broken_plugin_warns_and_other_names_still_resolve(monkeypatch, tiny_model):
    broken = EntryPoint(name="broken", value="dreambooth_no_such_module:register", group=aliases.ENTRY_POINT_GROUP)
    monkeypatch.setattr(aliases, "entry_points", lambda group: [broken])
    with pytest.warns(UserWarning, match="'broken'"):
        register_model_alias("tiny-sd", lambda: tiny_model)
    assert model_alias_folder("tiny-sd") == tiny_model


def test_names_that_would_shadow_hub_ids_are_refused():
    with pytest.raises(ValueError, match="without '/'"):
        register_model_alias("owner/name", lambda: Path("."))


def test_the_core_never_imports_the_miniature_world_and_finds_it_by_entry_point():
    core = sorted(p.stem for p in Path(aliases.__file__).parent.glob("*.py") if p.stem not in ("cli", "__main__"))
    script = f"""
import importlib, sys
for name in {core!r}:
    importlib.import_module("dreambooth." + name)
loaded = [m for m in sys.modules if m.startswith("dreambooth.miniworld")]
assert not loaded, loaded
from dreambooth.errors import UserError
from dreambooth.models import resolve_model
try:
    print(resolve_model("miniworld").location)
except UserError as error:  # weights not shipped in this checkout: the plugin still answered
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "miniworld" in result.stdout
