"""`dreambooth push`: the exact files it uploads and where, the card it writes for the repository, and one line for
every way it cannot (offline, not logged in, refused, a run that is not finished). Nothing here reaches the hub:
conftest sets HF_HUB_OFFLINE, and the one full push runs against HfApi methods replaced by recorders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from dreambooth.checkpoints import RunPaths
from dreambooth.config import PushConfig
from dreambooth.errors import UserError
from dreambooth.files import LOCK_FILE
from dreambooth.hub import hub_failure, published_settings, push, upload_list
from dreambooth.lora import BASE_MODEL, LORA_WEIGHTS
from dreambooth.train import train

from conftest import write_images
from test_train import make_config

VALIDATION = ["a photo of miru cat on the beach", "a photo of miru cat in the snow"]


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> RunPaths:
    """A finished 2-step run with validation images at both steps and a checkpoint at each."""
    root = tmp_path_factory.mktemp("push")
    write_images(root / "instance", 3, seed=1)
    return train(make_config(tiny_model, root / "instance", root / "miru", max_train_steps=2, checkpoint_every=1,
                             keep_checkpoints=2, validation_prompt=VALIDATION, validation_every=1,
                             validation_seeds=[0], validation_sampling_steps=1))


@pytest.fixture
def run(finished, tmp_path) -> RunPaths:
    """A copy of the finished run with what a run folder may hold besides: none of it is uploaded."""
    paths = RunPaths(Path(shutil.copytree(finished.root, tmp_path / "miru")))
    clutter = [LOCK_FILE, "replaced-20250101-120000/README.md", ".pipeline.0123abcd.tmp/model_index.json",
               "pipeline/.model_index.0123abcd.tmp.json", "checkpoints/step-000001.damaged/state.json",
               "pipelines/step-000001/model_index.json", "logs/wandb/offline-run-1/files/config.yaml",
               "instance/photo.png"]
    for name in clutter:
        (paths.root / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.root / name).write_text("not for the hub")
    (paths.root / "logs" / "earlier").mkdir(parents=True)
    (paths.root / "logs" / "earlier" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"events")
    return paths


def pipeline_files(paths: RunPaths) -> list[str]:
    return sorted(path.relative_to(paths.pipeline).as_posix() for path in paths.pipeline.rglob("*")
                  if path.is_file() and not path.name.startswith("."))


def test_push_uploads_the_model_at_the_root_the_card_and_its_images(run):
    card = ModelCard.load(run.model_card).content
    files = upload_list(run, card)
    assert all(local.is_file() for local, _ in files)
    in_repo = {name: local.relative_to(run.root).as_posix() for local, name in files}
    model = {name: f"pipeline/{name}" for name in pipeline_files(run)}
    assert "unet/diffusion_pytorch_model.safetensors" in model and "model_index.json" in model
    events = {path.relative_to(run.root).as_posix(): path.relative_to(run.root).as_posix()
              for path in run.root.glob("logs/**/*tfevents*")}
    assert "logs/earlier/events.out.tfevents.1700000000.host.1.0" in events
    assert in_repo == {
        **model,
        **{name: name for name in ("README.md", "config.yaml", "loss.png", "metrics.jsonl")},
        "validation/step-000002/p0-seed0.png": "validation/step-000002/p0-seed0.png",  # the widget's: newest step
        "validation/step-000002/p1-seed0.png": "validation/step-000002/p1-seed0.png",
        **events,  # TensorBoard's (the Hub shows them), not wandb's
    }
    assert [name for _, name in files] == sorted(in_repo)
    with_checkpoints = dict((name, local) for local, name in upload_list(run, card, include_checkpoints=True))
    added = sorted(set(with_checkpoints) - set(in_repo))
    assert added and {name.split("/")[1] for name in added} == {"step-000001", "step-000002"}
    assert all(name.startswith("checkpoints/") and (with_checkpoints[name].relative_to(run.root).as_posix() == name)
               for name in added)
    assert any(name.endswith("/model.safetensors") for name in added)


def test_a_lora_run_uploads_the_lora_folder_at_the_root(run):
    shutil.rmtree(run.pipeline)
    run.lora.mkdir()
    for name in (LORA_WEIGHTS, BASE_MODEL, "embeddings.safetensors"):
        (run.lora / name).write_text("{}")
    names = [name for _, name in upload_list(run, ModelCard.load(run.model_card).content)]
    assert {LORA_WEIGHTS, BASE_MODEL, "embeddings.safetensors", "README.md"} <= set(names)
    assert not any(name.startswith(("lora/", "pipeline", "unet/")) for name in names)


def test_dry_run_lists_and_touches_nothing(run):
    before = {path: path.read_bytes() for path in run.root.rglob("*") if path.is_file()}
    listing = push(PushConfig(run=str(run.root), repo_id="me/miru", dry_run=True))
    assert listing.startswith("dry run, nothing uploaded: ") and "https://huggingface.co/me/miru" in listing
    assert "  unet/diffusion_pytorch_model.safetensors  <- pipeline/unet/diffusion_pytorch_model.safetensors" in listing
    assert "  README.md  (the card, written for the repository)" in listing
    assert "replaced-" not in listing and ".tmp" not in listing and "damaged" not in listing
    assert {path: path.read_bytes() for path in run.root.rglob("*") if path.is_file()} == before


def test_push_creates_the_repository_and_commits_exactly_the_list(run, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"] = [(op.path_or_fileobj, op.path_in_repo) for op in operations]
        calls["locked"] = (run.root / LOCK_FILE).is_file()  # no training run can write the folder meanwhile

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    (run.root / LOCK_FILE).unlink()  # the clutter's stale lock file would only be taken over
    run.model_card.write_text(run.model_card.read_text() + "\nmy own notes\n")
    url = push(PushConfig(run=str(run.root), repo_id="me/miru", private=True))
    assert url == "https://huggingface.co/me/miru"
    assert calls["create_repo"] == ("me/miru", {"private": True, "exist_ok": True})
    card = run.model_card.read_text()
    assert 'StableDiffusionPipeline.from_pretrained("me/miru")' in card and "my own notes" not in card
    # The edited card, moved aside: nothing is lost.
    (kept,) = (path for path in run.root.glob("replaced-*/README.md") if "20250101" not in str(path))
    assert "my own notes" in kept.read_text()
    assert calls["create_commit"] == [(published_settings(run) if name == "config.yaml" else str(local), name)
                                      for local, name in upload_list(run, card)]
    published = published_settings(run).decode()  # the photos' and the run's folders by name, not by path
    assert str(run.root.parent) not in published and "instance_dir: " in published
    assert calls["locked"] and not (run.root / LOCK_FILE).exists()


def test_offline_or_not_logged_in_is_one_line_and_nothing_changes(run, monkeypatch, tmp_path):
    import huggingface_hub.constants

    card = run.model_card.read_bytes()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError, match=r"^not logged in to the Hugging Face Hub; run `hf auth login`, or set "
                                        r"HF_TOKEN to a token with write access$"):
        push(PushConfig(run=str(run.root), repo_id="me/miru"))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(UserError, match=r"^the hub is offline \(HF_HUB_OFFLINE is set\); unset it on a machine "
                                        r"with a network, then push again$"):
        push(PushConfig(run=str(run.root), repo_id="me/miru"))  # HF_HUB_OFFLINE=1 (conftest): fails fast
    assert run.model_card.read_bytes() == card


def test_hub_refusals_are_one_line():
    import httpx2 as httpx  # huggingface_hub's HTTP client (the package httpx2)
    from huggingface_hub.errors import HfHubHTTPError

    def refused(status: int) -> HfHubHTTPError:
        response = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
        return HfHubHTTPError(f"{status} Client Error\nmore detail", response=response)

    assert hub_failure(refused(401), "me/miru").startswith("the hub refused the token (401 Unauthorized); run")
    assert hub_failure(refused(403), "them/miru").startswith("--repo-id them/miru: this token may not write there")
    assert hub_failure(refused(500), "me/miru") == "the hub refused the upload to me/miru (500 Client Error)"
    assert hub_failure(ConnectionError("Name or service not known"), "me/miru") == (
        "could not reach the Hugging Face Hub (Name or service not known); check your network, then push again")


def test_only_a_finished_run_and_a_user_name_pair_are_pushed(run, tmp_path):
    with pytest.raises(UserError, match=r"^RUN .*: not a dreambooth run folder \(no config.yaml\)$"):
        push(PushConfig(run=str(tmp_path / "instance-photos"), repo_id="me/miru", dry_run=True))
    shutil.rmtree(run.pipeline)
    with pytest.raises(UserError, match=r"^RUN .*: training has not finished \(no pipeline/ or lora/ yet\); finish it "
                                        r"with `dreambooth train --config .*config.yaml --resume`, then push$"):
        push(PushConfig(run=str(run.root), repo_id="me/miru", dry_run=True))
    for repo_id, message in (("miru", "give USER/NAME"), ("me/mi ru", "not a repository id")):
        with pytest.raises(UserError, match=rf"^--repo-id {repo_id}: {message}"):
            push(PushConfig(run=str(tmp_path), repo_id=repo_id, dry_run=True))

