"""The demo base-model builder on a small recipe: output, cache hit, atomic write, refusals."""

from __future__ import annotations

import json
import os

import attrs
import pytest

from areal_core.demo import base_model
from areal_core.demo.base_model import (
    MARKER_NAME,
    BaseModelBuildError,
    BaseModelRecipe,
    build_base_model,
    read_marker,
)

pytestmark = pytest.mark.slow

SMALL = BaseModelRecipe(
    hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
    steps=3, batch_size=8, warmup_steps=1, held_out=50,
)
HF_FILES = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", MARKER_NAME]


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("builds") / "base", SMALL)


def test_build_writes_a_loadable_hf_directory_with_its_recipe(small_build):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in HF_FILES:
        assert (small_build / name).is_file(), name
    marker = read_marker(small_build)
    assert marker["hash"] == SMALL.digest()
    assert marker["recipe"] == attrs.asdict(SMALL)
    assert 0.0 <= marker["metrics"]["eval_accuracy_greedy"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(small_build, dtype=torch.float32)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert model.config.hidden_size == 32 and model.config.eos_token_id == 2
    tokenizer = AutoTokenizer.from_pretrained(small_build)
    assert tokenizer("<bos>57+68=").input_ids == base_model.arithmetic.prompt_ids(57, 68)
    assert json.loads((small_build / "generation_config.json").read_text())["eos_token_id"] == 2
    assert _leftovers(small_build.parent, small_build.name) == []


def test_second_call_with_the_same_recipe_does_not_rebuild(small_build, monkeypatch):
    before = (small_build / "model.safetensors").stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached build was rebuilt")

    monkeypatch.setattr(base_model, "train_base_model", must_not_train)
    assert build_base_model(small_build, SMALL) == small_build
    assert (small_build / "model.safetensors").stat().st_mtime_ns == before


def test_same_recipe_builds_the_same_weights(small_build, tmp_path):
    from safetensors.torch import load_file

    again = build_base_model(tmp_path / "again", SMALL)
    first, second = load_file(small_build / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_the_directory_appears_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "base"
    original_install = base_model._install
    seen = {}

    def checking_install(staging, target):
        seen["target_existed"] = target.exists()
        seen["staging_files"] = sorted(p.name for p in staging.iterdir())
        original_install(staging, target)

    monkeypatch.setattr(base_model, "_install", checking_install)
    build_base_model(out, SMALL)
    assert seen["target_existed"] is False
    assert set(HF_FILES) <= set(seen["staging_files"])
    assert read_marker(out)["hash"] == SMALL.digest()


def test_a_failed_build_leaves_no_directory_and_keeps_a_previous_one(tmp_path, monkeypatch):
    def failing_write(model, directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(base_model, "save_model_directory", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        build_base_model(tmp_path / "fresh", SMALL)
    assert not (tmp_path / "fresh").exists()
    assert _leftovers(tmp_path, "fresh") == []

    monkeypatch.undo()
    previous = build_base_model(tmp_path / "kept", SMALL)
    monkeypatch.setattr(base_model, "save_model_directory", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        build_base_model(previous, attrs.evolve(SMALL, steps=4))
    assert read_marker(previous)["hash"] == SMALL.digest()
    assert (previous / "model.safetensors").is_file()


def test_another_recipe_replaces_a_previous_build(small_build, tmp_path):
    out = build_base_model(tmp_path / "base", SMALL)
    other = attrs.evolve(SMALL, steps=4)
    assert other.digest() != SMALL.digest()
    assert build_base_model(out, other) == out
    assert read_marker(out)["hash"] == other.digest()
    assert _leftovers(tmp_path, "base") == []


def test_a_directory_that_is_not_a_build_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BaseModelBuildError, match=f"no {MARKER_NAME}.*choose another output directory"):
        build_base_model(out, SMALL)
    assert (out / "notes.txt").read_text() == "keep me"
    assert base_model.main(["--out", str(out), "--steps", "1"]) == 1


def test_command_line_builds_then_hits_the_cache(tmp_path, capsys):
    out = tmp_path / "cli"
    assert base_model.main(["--out", str(out), "--steps", "2", "--threads", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["path"] == str(out.absolute()) and first["num_parameters"] > 900_000
    mtime = os.stat(out / "model.safetensors").st_mtime_ns
    assert base_model.main(["--out", str(out), "--steps", "2"]) == 0
    assert "already holds recipe" in capsys.readouterr().out
    assert os.stat(out / "model.safetensors").st_mtime_ns == mtime


def test_staging_left_by_a_killed_build_is_removed(tmp_path):
    killed = tmp_path / ".base.building-999999999-abc"  # no such process
    running = tmp_path / f".base.building-{os.getpid()}-xyz"  # a build still under way
    for path in (killed, running):
        path.mkdir()
        (path / "config.json").write_text("{}")
    build_base_model(tmp_path / "base", SMALL)
    assert not killed.exists()
    assert running.exists()
