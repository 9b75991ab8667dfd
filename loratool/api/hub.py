"""`push` and `pull`: adapters to and from the Hugging Face Hub."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import env
from ..checkpoint.output import atomic_output, check_output_path, copy_regular_file
from ..errors import AdapterError, UsageError
from ..formats.adapters import load_adapter, peft_config_for
from ..formats.peft import CONFIG_NAME, WEIGHTS_NAME, find_peft_folder, write_peft_adapter
from ..hub.card import adapter_card
from ..hub.client import ADAPTER_PATTERNS, HubError, download, hub_call, quiet_progress_unless_terminal
from .merge import merge
from ..options import check_finite

CARD_NAME = "README.md"


@dataclass
class PushResult:
    repo_id: str
    files: dict[str, int]
    card: str
    dry_run: bool
    commit_url: str | None = None
    pr_url: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "files": self.files, "dry_run": self.dry_run,
                "commit_url": self.commit_url, "pr_url": self.pr_url, "notes": self.notes}


def _stage(path: Path, staging: Path, keep_original: bool, allow_pickle: bool, notes: list[str]):
    """Copy (or convert to) the PEFT safetensors files to upload into `staging`; return the adapter."""
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    if adapter.unresolved_names:
        raise AdapterError(f"{path} is a kohya file whose module names need the base model; convert it first: "
                           "loratool convert FILE --to peft --base BASE -o ADAPTER")
    check_finite([adapter])
    folder = find_peft_folder(path) if adapter.source_format == "peft" else None
    if folder is not None and (folder / WEIGHTS_NAME).is_file():
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            copy_regular_file(folder / name, staging / name)
        return adapter, folder
    write_peft_adapter(staging, adapter.modules, adapter.full_tensors, peft_config_for(adapter))
    notes.append(f"converted the {adapter.source_format} adapter to PEFT safetensors for upload")
    if keep_original and path.is_file() and path.suffix == ".safetensors":
        (staging / "original").mkdir()
        copy_regular_file(path, staging / "original" / path.name)
    return adapter, folder


def push(adapter: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, message: str | None = None, token_env: str | None = None, dry_run: bool = False,
         include_merged: str | os.PathLike | None = None, card_overwrite: bool = False, keep_original: bool = False,
         base_model: str | None = None, allow_pickle: bool = False) -> PushResult:
    """Validate, stage and upload an adapter with a model card. Pickle files are never uploaded."""
    from huggingface_hub import HfApi

    path = Path(adapter)
    if "/" not in repo_id:
        raise UsageError(f"REPO_ID must be owner/name, got {repo_id!r}")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="loratool-push-") as scratch:
        staging = Path(scratch)
        loaded, folder = _stage(path, staging, keep_original, allow_pickle, notes)
        adapter_bytes = (staging / WEIGHTS_NAME).stat().st_size
        existing = folder / CARD_NAME if folder is not None else None
        if existing is not None and existing.is_file() and not card_overwrite:
            copy_regular_file(existing, staging / CARD_NAME)
            notes.append(f"kept the existing {CARD_NAME} (--card-overwrite replaces it)")
        else:
            loaded.config = json.loads((staging / CONFIG_NAME).read_text())
            adapter_card(loaded, repo_id, adapter_bytes, base_model).save(staging / CARD_NAME)
        if include_merged is not None:
            merge(include_merged, [loaded], staging / "merged", allow_pickle=allow_pickle)
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        card = (staging / CARD_NAME).read_text()
        if dry_run:
            return PushResult(repo_id, files, card, True, notes=notes)
        token = env.hub_token(token_env)
        if not token:
            where = f"${token_env}" if token_env else "HF_TOKEN"
            raise HubError(f"no Hugging Face token: {where} is empty and no `hf auth login` token is cached")
        quiet_progress_unless_terminal()
        api = HfApi(endpoint=env.hub_endpoint(), token=token)
        with hub_call(f"pushing to {repo_id}", repo_id, token):
            # upload_folder has the Hub validate README.md's YAML header (POST /api/validate-yaml) first.
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision, create_pr=create_pr,
                                     commit_message=message or "Upload LoRA adapter with loratool")
    return PushResult(repo_id, files, card, False, info.commit_url, info.pr_url, notes)


@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    output: Path
    files: list[str]
    modules: int

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "output": str(self.output), "files": self.files,
                "modules": self.modules}


def pull(repo_id: str, output: str | os.PathLike, revision: str | None = None, force: bool = False) -> PullResult:
    """Download only an adapter's files into OUT and check that they form a valid adapter."""
    output = Path(output)
    check_output_path(output, [], force)
    with atomic_output(output, is_folder=True) as temp:
        download(repo_id, revision, ADAPTER_PATTERNS, local_dir=temp)
        shutil.rmtree(temp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
        if not (temp / CONFIG_NAME).is_file():
            raise AdapterError(f"{repo_id} has no {CONFIG_NAME}: it does not hold a PEFT adapter")
        adapter = load_adapter(temp)
        files = sorted(p.name for p in temp.iterdir())
    return PullResult(repo_id, revision, output, files, len(adapter.modules))
