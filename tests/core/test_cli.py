"""The areal command: JSON shapes, exit codes, and start-up without torch."""

import json
import subprocess
import sys
from pathlib import Path

AREAL = [sys.executable, "-m", "areal_core.cli"]


def run(*args, check=True):
    result = subprocess.run([*AREAL, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_matrix_json_shape():
    data = json.loads(run("matrix", "--json").stdout)
    assert {"fsdp2", "megatron"} <= set(data["engines"]) and {"vllm", "sglang"} <= set(data["servers"])
    cells = {(c["engine"], c["server"]): c for c in data["cells"]}
    assert set(cells) == {(e, s) for e in data["engines"] for s in data["servers"]}
    for cell in cells.values():
        assert isinstance(cell["supported"], bool) and isinstance(cell["reason"], str)
        assert cell["supported"] == (cell["reason"] == "")
        assert isinstance(cell["multi_adapter"], bool) and isinstance(cell["multi_adapter_reason"], str)
        assert cell["multi_adapter"] == (cell["multi_adapter_reason"] == "")
        assert cell["supported"] or not cell["multi_adapter"]
    assert cells[("fsdp2", "vllm")]["multi_adapter"]  # both declare it


def test_plugins_json_shape():
    data = json.loads(run("plugins", "--json").stdout)
    records = {p["name"]: p for p in data["plugins"]}
    for name in ("fsdp2", "megatron", "vllm", "sglang"):
        record = records[name]
        assert record["status"] == "ok" and record["error"] == ""
        assert record["distribution"] == f"areal-{name}" and record["version"]
        assert record["provides"] == [name]
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["fsdp2"]["kind"] == "engine" and backends["vllm"]["kind"] == "server"
    for name in ("fsdp2", "vllm", "sglang"):
        assert backends[name]["lora"]["multi_adapter"] is True
    assert isinstance(backends["megatron"]["lora"]["multi_adapter"], bool)


def test_matrix_markdown_has_engines_as_rows():
    lines = run("matrix").stdout.splitlines()
    assert lines[0].startswith("| Engine |") and "vllm" in lines[0] and "sglang" in lines[0]
    assert any(line.startswith("| fsdp2 |") for line in lines)


def test_import_and_matrix_leave_torch_out():
    code = (
        "import sys, io, contextlib\n"
        "import areal_core\n"
        "assert 'torch' not in sys.modules, 'import areal_core imported torch'\n"
        "from areal_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['matrix']); main(['matrix', '--json']); main(['plugins', '--json'])\n"
        "    areal_core.supports('fsdp2', 'vllm'); areal_core.support_matrix().to_dict()\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers', 'peft', 'megatron') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr


def test_check_lists_several_errors_and_exits_1(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("actor:\n  lora_rank: 0\n  peft_type: ia3\n  lora_rnak: 3\ngconfig:\n  n_samples: 1\n")
    result = run("check", str(config), "train.steps=0", check=False)
    assert result.returncode == 1
    for key in ("actor.lora_rank", "actor.peft_type", "actor.lora_rnak", "gconfig.n_samples", "train.steps",
                "actor.path"):
        assert key in result.stderr, key


def test_check_json_reports_errors(tmp_path):
    result = run("check", str(tmp_path / "absent.yaml"), "--json", check=False)
    data = json.loads(result.stdout)
    assert result.returncode == 1 and data["ok"] is False
    assert any(e["key"] == "CONFIG" and "not found" in e["problem"] for e in data["errors"])
