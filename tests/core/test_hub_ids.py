"""Hub ids in model paths, resolved through a real Hugging Face cache (no network)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from areal_core.hub import HubResolutionError, looks_like_hub_id, provenance_comment, resolve_model
from tests.hf_cache import add_to_cache, use_cache_offline

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hf_home(tmp_path, vllm_model, monkeypatch):
    """HF_HOME in a temporary directory, holding tiny-org/tiny at COMMIT (main) and OTHER_COMMIT (dev)."""
    home = tmp_path / "hf"
    add_to_cache(home, "tiny-org/tiny", vllm_model, COMMIT)
    add_to_cache(home, "tiny-org/tiny", vllm_model, OTHER_COMMIT, branch="dev")
    use_cache_offline(monkeypatch, home)
    return home


def test_a_cached_id_resolves_to_its_snapshot(hf_home):
    model = resolve_model("tiny-org/tiny", download=True)
    assert Path(model.path) == hf_home / "hub" / "models--tiny-org--tiny" / "snapshots" / COMMIT
    assert (model.repo_id, model.revision, model.commit) == ("tiny-org/tiny", None, COMMIT)
    assert (Path(model.path) / "config.json").is_file()


@pytest.mark.parametrize("revision, commit", [("dev", OTHER_COMMIT), (COMMIT, COMMIT)])
def test_a_revision_picks_a_branch_or_a_commit(hf_home, revision, commit):
    model = resolve_model(f"tiny-org/tiny@{revision}", download=False)
    assert model.commit == commit and model.revision == revision


def test_a_local_directory_wins_over_a_hub_id_of_the_same_spelling(hf_home, tmp_path, monkeypatch):
    local = tmp_path / "work" / "tiny-org" / "tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model("tiny-org/tiny", download=True).path == "tiny-org/tiny"
    assert resolve_model("tiny-org/tiny", download=True).repo_id is None


def test_a_missing_id_offline_names_the_cache_and_the_fix(hf_home):
    with pytest.raises(HubResolutionError) as caught:
        resolve_model("models/Qwen2.5-1.5B-Instruct", download=True)
    message = str(caught.value)
    assert "not a local directory" in message  # both readings of the spelling
    assert "not in the Hugging Face cache" in message and str(hf_home / "hub") in message
    assert "HF_HUB_OFFLINE" in message and "hf download models/Qwen2.5-1.5B-Instruct" in message


def test_check_never_downloads(hf_home, monkeypatch):
    import huggingface_hub

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, yet the cache alone is asked
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: calls.append(k["local_files_only"]) or real(*a, **k))
    with pytest.raises(HubResolutionError, match="areal train` downloads it"):
        resolve_model("tiny-org/absent", download=False)
    assert calls == [True]


def test_neither_a_directory_nor_an_id(hf_home):
    with pytest.raises(HubResolutionError, match="not a local directory, and not a Hub id"):
        resolve_model("./no/such/dir", download=True)
    assert not looks_like_hub_id("/abs/path") and looks_like_hub_id("Qwen/Qwen2.5-1.5B-Instruct@v1.0")


def areal(*args, env=None):
    return subprocess.run([sys.executable, "-m", "areal_core.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def test_areal_check_takes_a_hub_id_from_the_cache(hf_home):
    example = str(REPO / "examples" / "arithmetic_grpo_lora.yaml")
    ok = areal("check", example, "actor.path=tiny-org/tiny", "actor.lora_rank=8")
    assert ok.returncode == 0, ok.stderr
    missing = areal("check", example, "actor.path=tiny-org/absent")
    assert missing.returncode == 1
    assert "actor.path" in missing.stderr and "not in the Hugging Face cache" in missing.stderr
    assert missing.stderr.count("actor.path") == 1  # one finding, not also "no such directory"


def test_config_yaml_names_the_model_and_commit(hf_home):
    from areal_core.config_loader import load_config

    snapshot = resolve_model("tiny-org/tiny", download=False).path
    config, _ = load_config(None, [f"actor.path={snapshot}"])
    assert provenance_comment(config) == f"# actor.path: Hugging Face Hub model tiny-org/tiny, commit {COMMIT}\n"


def test_an_adapter_entrys_own_tokenizer_id_is_resolved_and_an_inherited_one_with_the_run(hf_home, tmp_path):
    from areal_core.config_loader import load_config
    from areal_core.hub import path_overrides, resolve_model_paths

    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        "dataset: {name: arithmetic, options: {tokenizer_path: tiny-org/tiny}}\n"
        "adapters:\n"
        "  - {name: add}\n"  # the run's dataset
        "  - {name: sub, dataset: {name: arithmetic, options: {operation: sub, tokenizer_path: tiny-org/tiny@dev}}}\n")
    config, errors = load_config(config_path)
    assert not errors
    resolved, errors = resolve_model_paths(config, download=False)
    assert not errors
    config, errors = load_config(config_path, path_overrides(resolved))
    assert not errors
    add, sub = config.adapters
    assert config.dataset.options["tokenizer_path"].endswith(COMMIT)
    assert add.dataset == config.dataset
    assert sub.dataset.options["tokenizer_path"].endswith(OTHER_COMMIT) and sub.dataset.options["operation"] == "sub"
    comment = provenance_comment(config)
    assert "adapters.sub.dataset.options.tokenizer_path" in comment and "adapters.add." not in comment
