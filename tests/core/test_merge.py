"""``areal merge``: the merged model computes what base + adapter compute, and every refusal
happens before a weight is loaded, leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from areal_core import merge as merge_module
from areal_core.cli import main
from areal_core.merge import COPIED_FILES
from areal_core.testing.numerics import relative_error, unit_roundoff
from areal_core.testing.peft_adapters import build_peft_adapter
from areal_core.testing.tiny_models import build_tiny_model

# The merged model's logits against peft's unmerged forward of base + adapter in float32, as
# ||merged - unmerged|| / ||unmerged|| over all logits of 4 sequences of 24 tokens (Frobenius
# norm), in unit roundoffs u of the dtype the merged model is written and run in. Measured on
# tiny Qwen2 and Llama models (2 seeds each, 2 adapters each, ATEN_CPU_CAPABILITY avx512, avx2
# and default alike):
#   float32 (u = 2^-24): 14.8 u to 19.1 u. The two forwards order their sums differently
#     (x (W + s B A)^T against x W^T + s (x A^T) B^T), and a sum of n <= 128 products rounded
#     in another order is off by about sqrt(n) u = 11 u.
#   bfloat16 (u = 2^-8): 3.7 u to 4.5 u. About 30 roundings to bfloat16 lie on the way to the
#     logits (14 merged weight matrices, a dozen activations per layer); independent errors of
#     up to u each add up in quadrature to about sqrt(30) u = 5.5 u.
# What the check is for, measured likewise: the adapter not merged (the base model) is
# 2.0e7 u (float32) and 308 u (bfloat16) off; merged with half, twice or sqrt(r) times its scale
# lora_alpha / r, 1.5e7 u and 224 u at least. The adapter (lora_B ~ N(0, 0.3)) moves the logits
# by more than their own size, so a real failure is a relative error of order 1 in any dtype.
#: float32: 13x the largest healthy error, 57,000x below the smallest failure.
FLOAT32_ULPS = 256
#: bfloat16: 7.1x the largest healthy error, 7x below the smallest failure (bfloat16's 8-bit
#: mantissa leaves a factor of 50 between its noise and an error of order 1; the bound sits at
#: their geometric middle).
BFLOAT16_ULPS = 32
ULPS = {"float32": FLOAT32_ULPS, "bfloat16": BFLOAT16_ULPS}
#: A failure must exceed the bound by at least this factor here, so that the margin is checked too.
FAILURE_MARGIN = 5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Qwen2 base (float32, tied embeddings), its own so that tests may copy and alter it."""
    return build_tiny_model(tmp_path_factory.mktemp("merge-base"), arch="qwen2")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A rank-8 adapter on every linear layer of ``base`` with lora_B drawn non-zero."""
    return Path(build_peft_adapter(base, tmp_path_factory.mktemp("merge-adapter") / "a",
                                   rank=8, seed=3, version=0).path)


@pytest.fixture(scope="module")
def token_ids():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 32, (4, 24), generator=generator)
    ids[:, 0] = 1
    return ids


def logits(model_dir, ids, *, dtype=torch.float32, adapter_dir=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.double()


def rescaled_copy(adapter_dir: Path, directory: Path, factor: float) -> Path:
    """The adapter with lora_alpha times ``factor``: what a merge with the wrong scale computes."""
    shutil.copytree(adapter_dir, directory)
    (directory / "areal_manifest.json").unlink()  # its checksum covers the config changed here
    config = json.loads((directory / "adapter_config.json").read_text())
    config["lora_alpha"] *= factor
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def run_merge(adapter_dir, base_dir, out, *extra) -> int:
    return main(["merge", str(adapter_dir), "--base", str(base_dir), "--out", str(out), *extra])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_logits_equal_base_plus_adapter(dtype, base, adapter, token_ids, tmp_path):
    out = tmp_path / "merged"
    assert run_merge(adapter, base, out, "--dtype", dtype) == 0
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging left beside it
    expected = logits(base, token_ids, adapter_dir=adapter)  # peft's unmerged forward, float32
    u = unit_roundoff(getattr(torch, dtype))
    bound = ULPS[dtype] * u
    error = relative_error(logits(out, token_ids, dtype=getattr(torch, dtype)), expected)
    assert error <= bound, f"merged {dtype} model: {error / u:.3g} u, bound {ULPS[dtype]} u"

    # The bound tells the failures the check exists for from the noise, by a wide margin.
    failures = {"not merged": relative_error(logits(base, token_ids), expected)}
    for factor in (0.5, 2.0):
        wrong = tmp_path / f"scale-x{factor}"
        run_merge(rescaled_copy(adapter, tmp_path / f"adapter-x{factor}", factor), base, wrong, "--dtype", dtype)
        failures[f"scale x{factor}"] = relative_error(logits(wrong, token_ids, dtype=getattr(torch, dtype)), expected)
    for name, failure in failures.items():
        assert failure > FAILURE_MARGIN * bound, f"{name}: {failure / u:.3g} u, not {FAILURE_MARGIN}x above {ULPS[dtype]} u"


def test_the_directory_holds_a_full_model_in_its_dtype(base, adapter, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    assert run_merge(adapter, base, out, "--dtype", "bfloat16") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["Qwen2ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
        assert not any("lora" in key for key in handle.keys())
    assert dtypes == {"BF16"}
    copied = [name for name in COPIED_FILES if (base / name).is_file()]
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(copied)
    for name in copied:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    text = "1+2=3"
    assert AutoTokenizer.from_pretrained(str(out))(text).input_ids == AutoTokenizer.from_pretrained(str(base))(text).input_ids


def test_default_dtype_is_the_bases(base, adapter, token_ids, tmp_path):
    bf16_base = tmp_path / "bf16-base"
    shutil.copytree(base, bf16_base)
    from transformers import AutoModelForCausalLM

    (bf16_base / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).save_pretrained(str(bf16_base))
    assert json.loads((bf16_base / "config.json").read_text())["dtype"] == "bfloat16"
    assert run_merge(adapter, bf16_base, tmp_path / "from-config") == 0
    assert json.loads((tmp_path / "from-config" / "config.json").read_text())["dtype"] == "bfloat16"
    # a config.json that names no dtype: the dtype the weights are stored in
    config = json.loads((bf16_base / "config.json").read_text())
    del config["dtype"]
    (bf16_base / "config.json").write_text(json.dumps(config))
    assert run_merge(adapter, bf16_base, tmp_path / "from-weights") == 0
    assert json.loads((tmp_path / "from-weights" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run_merge(adapter, base, tmp_path / "float32") == 0
    assert json.loads((tmp_path / "float32" / "config.json").read_text())["dtype"] == "float32"


def test_shards_hold_the_same_weights(base, adapter, token_ids, tmp_path):
    assert run_merge(adapter, base, tmp_path / "whole") == 0
    assert run_merge(adapter, base, tmp_path / "sharded", "--max-shard-size", "40KB") == 0
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(tmp_path / "sharded", token_ids), logits(tmp_path / "whole", token_ids))


# --- refusals: exit code 1, a message naming the problem, no weight loaded, nothing written ----------


@pytest.fixture
def no_weights_loaded(monkeypatch):
    def refuse(plan):
        raise AssertionError("a refused merge loaded weights")

    monkeypatch.setattr(merge_module, "merged_model", refuse)


def assert_refused(capsys, tmp_path, argv_out: Path, rc: int, *patterns: str) -> None:
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "refused, nothing was written" in err
    for pattern in patterns:
        assert pattern in err, err
    assert not os.path.lexists(argv_out) or argv_out.name == "taken"
    assert not [p for p in os.listdir(argv_out.parent) if ".partial-" in p]


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    """Bases the adapter was not trained on: wider MLP (shapes differ), one layer (modules missing)."""
    root = tmp_path_factory.mktemp("other-bases")
    return {
        "wider": build_tiny_model(root / "wider", arch="qwen2", intermediate_size=96),
        "shallower": build_tiny_model(root / "shallower", arch="qwen2", num_layers=1),
    }


@pytest.mark.parametrize("which,patterns", [
    ("wider", ["does not fit --base", "mlp.down_proj.lora_A.weight has shape (8, 128)",
               "in_features=96", "merge it into the model it was trained on"]),
    ("shallower", ["does not fit --base", "model.layers.1.", "has no linear weight for"]),
])
def test_an_adapter_of_another_base_is_refused(which, patterns, adapter, other_bases, tmp_path, capsys,
                                              no_weights_loaded):
    rc = run_merge(adapter, other_bases[which], tmp_path / "merged")
    assert_refused(capsys, tmp_path, tmp_path / "merged", rc, *patterns)


@pytest.mark.parametrize("kind", ["directory", "file", "dangling symlink"])
def test_an_existing_out_is_refused(kind, base, adapter, tmp_path, capsys, no_weights_loaded):
    out = tmp_path / "taken"
    if kind == "directory":
        out.mkdir()
    elif kind == "file":
        out.write_text("mine")
    else:
        out.symlink_to(tmp_path / "nowhere")
    before = sorted(os.listdir(tmp_path))
    rc = run_merge(adapter, base, out)
    assert_refused(capsys, tmp_path, out, rc, "already exists", "choose a new path")
    assert sorted(os.listdir(tmp_path)) == before
    if kind == "file":
        assert out.read_text() == "mine"


@pytest.mark.parametrize("option,value,patterns", [
    ("--dtype", "float8", ["--dtype 'float8'", "float32, bfloat16, float16"]),
    ("--max-shard-size", "1.5GB", ["--max-shard-size '1.5GB' is not a size", "e.g. 2GB"]),
    ("--max-shard-size", "0GB", ["--max-shard-size '0GB' is not a size"]),
])
def test_a_bad_option_is_refused(option, value, patterns, base, adapter, tmp_path, capsys, no_weights_loaded):
    rc = run_merge(adapter, base, tmp_path / "merged", option, value)
    assert_refused(capsys, tmp_path, tmp_path / "merged", rc, *patterns)


def _pickled(adapter_dir: Path, directory: Path) -> Path:
    directory.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", directory)
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    return directory


def _missing(adapter_dir: Path, directory: Path) -> Path:
    return directory


def _bad_config(adapter_dir: Path, directory: Path) -> Path:
    shutil.copytree(adapter_dir, directory)
    (directory / "areal_manifest.json").unlink()
    (directory / "adapter_config.json").write_text("{not json")
    return directory


def _bad_weights(adapter_dir: Path, directory: Path) -> Path:
    shutil.copytree(adapter_dir, directory)
    (directory / "areal_manifest.json").unlink()
    (directory / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return directory


@pytest.mark.parametrize("make,patterns", [
    (_pickled, ["pickled weights (adapter_model.bin)", "only safetensors are accepted"]),
    (_missing, ["does not exist"]),
    (_bad_config, ["is unreadable", "JSONDecodeError"]),
    (_bad_weights, ["is unreadable", "export it again"]),
], ids=["pickled", "missing", "unreadable config", "unreadable weights"])
def test_a_bad_adapter_is_refused(make, patterns, base, adapter, tmp_path, capsys, no_weights_loaded):
    bad = make(adapter, tmp_path / "bad-adapter")
    rc = run_merge(bad, base, tmp_path / "merged")
    assert_refused(capsys, tmp_path, tmp_path / "merged", rc, str(bad), *patterns)


def _base_missing(base_dir: Path, directory: Path) -> Path:
    return directory


def _base_pickled(base_dir: Path, directory: Path) -> Path:
    shutil.copytree(base_dir, directory)
    os.rename(directory / "model.safetensors", directory / "pytorch_model.bin")
    return directory


def _base_without_config(base_dir: Path, directory: Path) -> Path:
    shutil.copytree(base_dir, directory)
    (directory / "config.json").unlink()
    return directory


def _base_with_bad_weights(base_dir: Path, directory: Path) -> Path:
    shutil.copytree(base_dir, directory)
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    return directory


@pytest.mark.parametrize("make,patterns", [
    (_base_missing, ["model directory does not exist"]),
    (_base_pickled, ["holds no *.safetensors (found pickled pytorch_model.bin)", "safe_serialization=True"]),
    (_base_without_config, ["no readable config.json"]),
    (_base_with_bad_weights, ["safetensors files are unreadable"]),
], ids=["missing", "pickled", "no config", "unreadable weights"])
def test_a_bad_base_is_refused(make, patterns, base, adapter, tmp_path, capsys, no_weights_loaded):
    bad = make(base, tmp_path / "bad-base")
    rc = run_merge(adapter, bad, tmp_path / "merged")
    assert_refused(capsys, tmp_path, tmp_path / "merged", rc, f"--base {bad}", *patterns)


def test_a_failure_midway_leaves_nothing(base, adapter, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def fill_the_disk(self, directory, **kwargs):
        original(self, directory, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fill_the_disk)
    rc = run_merge(adapter, base, tmp_path / "merged")
    err = capsys.readouterr().err
    assert rc == 1 and "failed, nothing was written" in err and "No space left on device" in err
    assert os.listdir(tmp_path) == []
