"""A real Hugging Face cache laid out on disk, as huggingface_hub writes and reads it:

    <HF_HOME>/hub/models--<org>--<name>/blobs/<sha256>            the files' bytes
                                        /refs/<branch>             the commit a branch points at
                                        /snapshots/<commit>/<file> links to the blobs
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_cache(hf_home: Path, repo_id: str, model_dir: Path, commit: str, branch: str | None = "main") -> Path:
    """Put the files of ``model_dir`` in the cache as ``repo_id`` at ``commit`` (and ``branch``);
    returns the snapshot directory."""
    org, name = repo_id.split("/")
    repo = Path(hf_home) / "hub" / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(model_dir).iterdir()):
        if not source.is_file():
            continue
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / source.name
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, snapshot), link)
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot


def use_cache_offline(monkeypatch, hf_home: Path) -> None:
    """Point this process (and its children) at ``hf_home``'s cache, offline. huggingface_hub
    reads its environment at import, so its constants are set as well as the variables."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
