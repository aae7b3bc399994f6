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


def altered_copy(source: Path, directory: Path, *, drop=(), garbage=(), rename=()) -> Path:
    """``source`` copied to ``directory``, less the files ``drop``, with the files ``garbage``
    overwritten by bytes no reader parses and each ``(old, new)`` of ``rename`` renamed."""
    shutil.copytree(source, directory)
    for name in drop:
        (directory / name).unlink()
    for name in garbage:
        (directory / name).write_bytes(b"\xff" * 64)
    for old, new in rename:
        os.rename(directory / old, directory / new)
    return directory


MANIFEST = "areal_manifest.json"  # dropped where a change would only be caught by its checksums


def rescaled_copy(adapter_dir: Path, directory: Path, factor: float) -> Path:
    """The adapter with lora_alpha times ``factor``: what a merge with the wrong scale computes."""
    altered_copy(adapter_dir, directory, drop=[MANIFEST])
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


def test_default_dtype_is_the_bases(base, adapter, tmp_path):
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


def test_the_base_may_be_a_hub_id_in_the_cache(base, adapter, token_ids, tmp_path, monkeypatch, capsys):
    from tests.hf_cache import add_to_cache, use_cache_offline

    home = tmp_path / "hf"
    add_to_cache(home, "tiny-org/merge-base", base, "0123456789abcdef0123456789abcdef01234567")
    use_cache_offline(monkeypatch, home)
    assert run_merge(adapter, "tiny-org/merge-base", tmp_path / "from-hub") == 0
    assert "models--tiny-org--merge-base/snapshots/0123456789abcdef" in capsys.readouterr().out
    assert run_merge(adapter, base, tmp_path / "from-directory") == 0
    assert torch.equal(logits(tmp_path / "from-hub", token_ids), logits(tmp_path / "from-directory", token_ids))
    refuse(capsys, adapter, "tiny-org/absent", tmp_path / "merged", "--base tiny-org/absent",
           "not in the Hugging Face cache")


# --- refusals: exit code 1, a message naming the problem, no weight loaded, nothing written ----------


@pytest.fixture
def no_weights_loaded(monkeypatch):
    def refuse(plan):
        raise AssertionError("a refused merge loaded weights")

    monkeypatch.setattr(merge_module, "merged_model", refuse)


def assert_refused(capsys, rc: int, directory: Path, before: list[str], *patterns: str) -> None:
    """Exit code 1, each of ``patterns`` in the message, and ``directory`` listing ``before``."""
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "refused, nothing was written" in err
    for pattern in patterns:
        assert pattern in err, err
    assert sorted(os.listdir(directory)) == before


def refuse(capsys, adapter_dir, base_dir, out: Path, *patterns: str, options=()) -> None:
    before = sorted(os.listdir(out.parent))
    rc = run_merge(adapter_dir, base_dir, out, *options)
    assert_refused(capsys, rc, out.parent, before, *patterns)


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
    refuse(capsys, adapter, other_bases[which], tmp_path / "merged", *patterns)


@pytest.mark.parametrize("kind", ["directory", "file", "dangling symlink"])
def test_an_existing_out_is_refused(kind, base, adapter, tmp_path, capsys, no_weights_loaded):
    out = tmp_path / "taken"
    if kind == "directory":
        out.mkdir()
    elif kind == "file":
        out.write_text("mine")
    else:
        out.symlink_to(tmp_path / "nowhere")
    refuse(capsys, adapter, base, out, "already exists", "choose a new path")
    if kind == "file":
        assert out.read_text() == "mine"


@pytest.mark.parametrize("option,value,patterns", [
    ("--dtype", "float8", ["--dtype 'float8'", "float32, bfloat16, float16"]),
    ("--max-shard-size", "1.5GB", ["--max-shard-size '1.5GB' is not a size", "e.g. 2GB"]),
    ("--max-shard-size", "0GB", ["--max-shard-size '0GB' is not a size"]),
])
def test_a_bad_option_is_refused(option, value, patterns, base, adapter, tmp_path, capsys, no_weights_loaded):
    refuse(capsys, adapter, base, tmp_path / "merged", *patterns, options=(option, value))


@pytest.mark.parametrize("alteration,patterns", [
    (dict(drop=[MANIFEST], rename=[("adapter_model.safetensors", "adapter_model.bin")]),
     ["pickled weights (adapter_model.bin)", "only safetensors are accepted"]),
    (None, ["does not exist"]),
    (dict(drop=[MANIFEST], garbage=["adapter_config.json"]), ["is unreadable", "export it again"]),
    (dict(drop=[MANIFEST], garbage=["adapter_model.safetensors"]), ["is unreadable", "export it again"]),
], ids=["pickled", "missing", "unreadable config", "unreadable weights"])
def test_a_bad_adapter_is_refused(alteration, patterns, base, adapter, tmp_path, capsys, no_weights_loaded):
    bad = tmp_path / "bad-adapter"
    if alteration is not None:
        altered_copy(adapter, bad, **alteration)
    refuse(capsys, bad, base, tmp_path / "merged", str(bad), *patterns)


@pytest.mark.parametrize("alteration,patterns", [
    (None, ["is not a local directory, and not a Hub id"]),
    (dict(rename=[("model.safetensors", "pytorch_model.bin")]),
     ["holds no *.safetensors (found pickled pytorch_model.bin)", "safe_serialization=True"]),
    (dict(drop=["config.json"]), ["no readable config.json"]),
    (dict(garbage=["model.safetensors"]), ["safetensors files are unreadable"]),
], ids=["missing", "pickled", "no config", "unreadable weights"])
def test_a_bad_base_is_refused(alteration, patterns, base, adapter, tmp_path, capsys, no_weights_loaded):
    bad = tmp_path / "bad-base"
    if alteration is not None:
        altered_copy(base, bad, **alteration)
    refuse(capsys, adapter, bad, tmp_path / "merged", f"--base {bad}", *patterns)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "interrupted"])
def test_a_failure_midway_leaves_nothing(failure, base, adapter, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def fail_after_writing(self, directory, **kwargs):
        original(self, directory, **kwargs)
        raise failure

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail_after_writing)
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            run_merge(adapter, base, tmp_path / "merged")
    else:
        assert run_merge(adapter, base, tmp_path / "merged") == 1
        err = capsys.readouterr().err
        assert "failed, nothing was written" in err and "No space left on device" in err
    assert os.listdir(tmp_path) == []
