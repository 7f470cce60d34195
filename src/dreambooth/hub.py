"""Publish a finished run to the Hugging Face Hub: `dreambooth push RUN --repo-id USER/NAME`.

The repository holds the trained model at its root (the diffusers pipeline, or the LoRA folder), so
`from_pretrained("USER/NAME")` or `load_lora_weights("USER/NAME")` loads it. Beside it, at their paths in the run
folder: the card (README.md, written for this repository), loss.png, metrics.jsonl, config.yaml, the validation
images the card's widget shows, TensorBoard's event files under logs/ (the Hub shows them in a Training metrics tab),
and with --include-checkpoints the resumable checkpoints. Never the lock file, temporary or hidden files, replaced-*
folders, intermediate pipelines, wandb's files, or any instance or class image. One commit of exactly these files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dreambooth.artifacts import model_card_text, run_record
from dreambooth.checkpoints import PATH_SETTINGS, STEP_FOLDER, RunPaths, is_trained_model
from dreambooth.config import PushConfig
from dreambooth.errors import UserError
from dreambooth.files import atomic_write_text, folder_lock, move_aside
from dreambooth.options import RUN_RECORD

LOGIN_HINT = "run `hf auth login`, or set HF_TOKEN to a token with write access"


def push(config: PushConfig) -> str:
    """Upload the run `config.run` to the hub repository `config.repo_id` (created if missing); return its URL, or
    for --dry-run the list of files it would upload."""
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token

    repo_id = check_repo_id(config.repo_id)
    paths = finished_run(config.run)
    settings = run_settings(paths)
    if config.dry_run:
        files = upload_list(paths, model_card_text(paths, settings, repo_id), config.include_checkpoints)
        return describe(files, paths, f"{constants.ENDPOINT}/{repo_id}")
    token = get_token()
    if token is None:
        raise UserError(f"not logged in to the Hugging Face Hub; {LOGIN_HINT}")
    api = HfApi(token=token)
    # The run's writer lock: a resumed training run writing this folder is not published half-way.
    with folder_lock(paths.root, "RUN"):
        try:
            url = api.create_repo(repo_id, private=config.private, exist_ok=True)
            fetch_base_model_card(settings, paths)
            card = write_card_for(paths, settings, repo_id)
            files = upload_list(paths, card, config.include_checkpoints)
            operations = [CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=(
                published_settings(paths) if in_repo == paths.config.name else str(local))) for local, in_repo in files]
            api.create_commit(repo_id, operations, commit_message=f"dreambooth run {paths.root.name}")
        except UserError:
            raise
        except Exception as error:  # the hub client raises many types; hub_failure words each in one line
            raise UserError(hub_failure(error, repo_id)) from error
    if not ModelCard(card).data.license:
        print(f"push: the card has no license (the base model's is not known here); set `license:` in "
              f"{paths.config} and push again to add one", file=sys.stderr)
    return str(url)


def finished_run(run: str) -> RunPaths:
    """The run folder `run`, refused unless training finished there (its pipeline or LoRA folder is written)."""
    paths = RunPaths(Path(run).expanduser())
    if not paths.config.is_file():
        raise UserError(f"RUN {run}: not a dreambooth run folder (no config.yaml)")
    if not is_trained_model(paths.final_model):
        raise UserError(f"RUN {run}: training has not finished (no pipeline/ or lora/ yet); finish it with "
                        f"`dreambooth train --config {paths.config} --resume`, then push")
    return paths


def check_repo_id(repo_id: str) -> str:
    """A repository id of the form USER/NAME, which the card's snippets and `--model` take as it is."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"--repo-id {repo_id}: not a repository id ({str(error).splitlines()[0]})") from error
    if repo_id.count("/") != 1:
        raise UserError(f"--repo-id {repo_id}: give USER/NAME (your user or organisation name, then the repository's)")
    return repo_id


def run_settings(paths: RunPaths) -> dict[str, Any]:
    """The run's settings as RUN/config.yaml records them, without the `_run` record (the card reads that itself)."""
    import yaml

    settings = yaml.safe_load(paths.config.read_text()) or {}
    settings.pop(RUN_RECORD, None)
    return settings


def upload_list(paths: RunPaths, card: str, include_checkpoints: bool = False) -> list[tuple[Path, str]]:
    """Every file push uploads, as (local path, path in the repository), sorted by the latter: what the module
    docstring lists. `card` is the card being uploaded; its widget names the validation images."""
    from huggingface_hub import ModelCard

    files = {in_repo: local for local, in_repo in tree(paths.final_model, "")}
    for name in (paths.model_card, paths.config, paths.loss_plot, paths.metrics):
        if name.is_file():
            files[name.name] = name
    widget = ModelCard(card).data.to_dict().get("widget") or []
    for url in (entry["output"]["url"] for entry in widget):
        if (paths.root / url).is_file():
            files[url] = paths.root / url
    files.update({in_repo: local for local, in_repo in tree(paths.root / "logs", "logs") if "tfevents" in local.name})
    if include_checkpoints and paths.checkpoints.is_dir():
        for folder in sorted(paths.checkpoints.iterdir()):
            if folder.is_dir() and STEP_FOLDER.match(folder.name):  # not step-N.damaged nor a temporary folder
                files.update({in_repo: local for local, in_repo in tree(folder, f"checkpoints/{folder.name}")})
    return sorted(((local, in_repo) for in_repo, local in files.items()), key=lambda item: item[1])


LOCAL_PATH_KEYS = PATH_SETTINGS | {"output", "logging_dir", "latent_cache_dir", "base_model", "base_model_location"}


def published_settings(paths: RunPaths) -> bytes:
    """RUN/config.yaml as it goes to the hub: a setting that names a local file or folder (the photos, the run
    folder, a local base model) is cut to its last name, so a repository never publishes the machine's paths."""
    import yaml

    def public(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {inner: public(inner, item) for inner, item in value.items()}
        local = isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value))
        return Path(value).name if key in LOCAL_PATH_KEYS and local else value

    record = yaml.safe_load(paths.config.read_text()) or {}
    return yaml.safe_dump(public("", record), sort_keys=False).encode("utf-8")


def tree(folder: Path, prefix: str) -> list[tuple[Path, str]]:
    """The files under `folder` as (path, path under `prefix`), leaving out hidden names (locks, temporary files
    and folders) and replaced-* folders (what --overwrite moved aside)."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if path.is_file() and not any(part.startswith((".", "replaced-")) for part in parts):
            found.append((path, "/".join(filter(None, (prefix, *parts)))))
    return found


def describe(files: list[tuple[Path, str]], paths: RunPaths, url: str) -> str:
    """--dry-run's answer: what would go where, and nothing uploaded."""
    size = sum(local.stat().st_size for local, _ in files)
    lines = [f"dry run, nothing uploaded: {len(files)} files ({size / 2**20:.1f} MiB) would go to {url}"]
    for local, in_repo in files:
        relative = local.relative_to(paths.root).as_posix()
        lines.append(f"  {in_repo}" + ("" if relative == in_repo else f"  <- {relative}")
                     + ("  (the card, written for the repository)" if local == paths.model_card else ""))
    return "\n".join(lines)


def write_card_for(paths: RunPaths, settings: dict[str, Any], repo_id: str) -> str:
    """Rewrite RUN/README.md for the repository (its snippet loads `repo_id`) and return it. A card that is neither
    the one dreambooth wrote for the run folder nor this one (edited by hand, say) is moved aside first."""
    card = model_card_text(paths, settings, repo_id)
    current = paths.model_card.read_text(encoding="utf-8") if paths.model_card.is_file() else None
    if current not in (None, card, model_card_text(paths, settings)):
        moved = move_aside(paths.root, [paths.model_card.name])
        print(f"push: {paths.model_card} differed from the card dreambooth writes; kept as "
              f"{moved / paths.model_card.name}", file=sys.stderr)
    if current != card:
        atomic_write_text(paths.model_card, card)
    return card


def fetch_base_model_card(settings: dict[str, Any], paths: RunPaths) -> None:
    """Put a hub base model's card in the hub cache, where the card reads its license, unless --license gave one.
    Online only (push is): training writes the card offline or not, so it never downloads."""
    from huggingface_hub import hf_hub_download

    run = run_record(paths)
    if settings.get("license") or run.get("base_model_kind") != "hub":
        return
    try:
        hf_hub_download(str(run["base_model"]), "README.md", revision=settings.get("revision"))
    except Exception:  # no card, a gated model, a network hiccup: the card goes without a license
        pass


def hub_failure(error: BaseException, repo_id: str) -> str:
    """One line for a failed hub call: offline, not logged in, refused, or the network."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OfflineModeIsEnabled):
        return "the hub is offline (HF_HUB_OFFLINE is set); unset it on a machine with a network, then push again"
    if isinstance(error, LocalTokenNotFoundError):
        return f"not logged in to the Hugging Face Hub; {LOGIN_HINT}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status == 401:
        return f"the hub refused the token (401 Unauthorized); {LOGIN_HINT}"
    if isinstance(error, HfHubHTTPError) and status == 403:
        return (f"--repo-id {repo_id}: this token may not write there (403 Forbidden); push to your own user or an "
                f"organisation you write to, or use a token with write access ({LOGIN_HINT})")
    if isinstance(error, HfHubHTTPError):
        return f"the hub refused the upload to {repo_id} ({first_line})"
    return f"could not reach the Hugging Face Hub ({first_line}); check your network, then push again"
