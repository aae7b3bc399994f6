"""`pip install "areal-core[fsdp2,vllm]"` from wheels installs exactly those plugins; outside plugins join.

A fresh venv is made from wheels built here. Heavy third-party dependencies (torch, transformers,
...) are reused from the test's own environment through a folder of links that leaves out every
areal distribution, so only what pip installs from the wheels is visible as areal plugins.
"""

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIRS = ["plugins/areal_fsdp2", "plugins/areal_megatron", "plugins/areal_vllm", "plugins/areal_sglang"]
pytestmark = pytest.mark.slow


def sh(*cmd, env=None, check=True, cwd=None):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def link_dependencies(target: Path) -> Path:
    """A folder linking every package of this environment except areal's own distributions."""
    target.mkdir()
    for site_dir in site.getsitepackages():
        for entry in Path(site_dir).iterdir():
            name = entry.name.lower()
            if name.startswith(("areal", "__editable__", "_areal")) or name.endswith(".pth"):
                continue
            if not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
       ".", *PLUGIN_DIRS, cwd=REPO)
    names = sorted(p.name.split("-")[0] for p in out.glob("*.whl"))
    assert names == ["areal_core", "areal_fsdp2", "areal_megatron", "areal_sglang", "areal_vllm"], names
    return out


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheels):
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)  # pip itself comes from the linked folder
    deps = link_dependencies(root / "deps")
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    (site_dir / "zz_reused_dependencies.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels,
       "areal-core[fsdp2,vllm]", env=env)
    return venv, env


def areal(venv_env, *args, check=True):
    venv, env = venv_env
    return sh(venv / "bin" / "areal", *args, env=env, check=check, cwd=venv.parent)


def test_extras_install_exactly_those_plugins(fresh_venv):
    venv, env = fresh_venv
    listed = sh(venv / "bin" / "python", "-m", "pip", "list", "--format=json", env=env).stdout
    installed = sorted(p["name"] for p in json.loads(listed) if p["name"].startswith("areal"))
    assert installed == ["areal-core", "areal-fsdp2", "areal-vllm"]
    plugins = json.loads(areal(fresh_venv, "plugins", "--json").stdout)["plugins"]
    assert [(p["name"], p["status"]) for p in plugins] == [("fsdp2", "ok"), ("vllm", "ok")]
    matrix = json.loads(areal(fresh_venv, "matrix", "--json").stdout)
    assert matrix["engines"] == ["fsdp2"] and matrix["servers"] == ["vllm"]
    assert [(c["engine"], c["server"]) for c in matrix["cells"]] == [("fsdp2", "vllm")]


OUTSIDE_PLUGINS = {
    "toy_engine.py": '''
        """An outside engine with LoRA, declaring the PEFT-directory transport."""
        import json, os
        from areal_core import hookimpl
        from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
        from areal_core.interfaces import ExportedAdapter

        @hookimpl
        def areal_declare_backends():
            return [BackendDeclaration(name="toy", kind="engine", version="9.9",
                                       lora=LoraSupport(status=LoraStatus.READY))]

        @hookimpl
        def areal_export_adapter(backend, engine, directory, version):
            if backend != "toy":
                return None
            with open(os.environ["TOY_EVENTS"], "a") as f:
                f.write(json.dumps(["toy export", version]) + "\\n")
            return ExportedAdapter(path=directory, version=version, rank=1, alpha=1, target_modules=("q_proj",))
    ''',
    "toy_archon.py": '''
        """An engine that declares no LoRA support (like the reference system's Archon)."""
        from areal_core import hookimpl
        from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport

        @hookimpl
        def areal_declare_backends():
            return [BackendDeclaration(name="archon", kind="engine", lora=LoraSupport(
                status=LoraStatus.UNSUPPORTED, reason="archon trains full weights only"))]
    ''',
    "toy_audit.py": '''
        """Wraps every engine's weight-export step."""
        import json, os
        from areal_core import hookimpl

        @hookimpl(wrapper=True)
        def areal_export_adapter(backend, engine, directory, version):
            with open(os.environ["TOY_EVENTS"], "a") as f:
                f.write(json.dumps(["audit before", backend]) + "\\n")
            result = yield
            with open(os.environ["TOY_EVENTS"], "a") as f:
                f.write(json.dumps(["audit after", result.version]) + "\\n")
            return result
    ''',
    "toy_broken.py": '''
        raise ImportError("toy_broken needs a library that is not installed")
    ''',
}


@pytest.fixture(scope="module")
def with_outside_plugins(fresh_venv, tmp_path_factory):
    venv, env = fresh_venv
    src = tmp_path_factory.mktemp("outside")
    for name, text in OUTSIDE_PLUGINS.items():
        (src / name).write_text(textwrap.dedent(text).lstrip())
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "toy-areal-plugins"
        version = "0.0.1"
        dependencies = ["areal-core"]
        [tool.setuptools]
        py-modules = ["toy_engine", "toy_archon", "toy_audit", "toy_broken"]
        [project.entry-points."areal.plugins"]
        toy = "toy_engine"
        archon = "toy_archon"
        audit = "toy_audit"
        broken = "toy_broken"
    '''))
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", src, env=env)
    return venv, env


def test_outside_engine_joins_the_matrix(with_outside_plugins):
    matrix = json.loads(areal(with_outside_plugins, "matrix", "--json").stdout)
    assert matrix["engines"] == ["archon", "fsdp2", "toy"]
    cells = {(c["engine"], c["server"]): c for c in matrix["cells"]}
    from areal_core.registry import default_registry

    vllm_ready = default_registry().declaration("vllm").lora.ready
    assert cells[("toy", "vllm")]["supported"] is vllm_ready  # toy is ready: only the server can say no
    assert "engine toy" not in cells[("toy", "vllm")]["reason"]
    assert cells[("archon", "vllm")]["supported"] is False
    assert "archon has no LoRA support: archon trains full weights only" in cells[("archon", "vllm")]["reason"]


def test_broken_outside_plugin_is_listed_and_the_rest_works(with_outside_plugins):
    plugins = {p["name"]: p for p in json.loads(areal(with_outside_plugins, "plugins", "--json").stdout)["plugins"]}
    assert plugins["broken"]["status"] == "broken"
    assert "needs a library that is not installed" in plugins["broken"]["error"]
    assert plugins["toy"]["status"] == "ok" and plugins["toy"]["distribution"] == "toy-areal-plugins"
    assert "| archon |" in areal(with_outside_plugins, "matrix").stdout


def test_engine_without_lora_is_refused_by_check(with_outside_plugins, tiny_qwen2):
    result = areal(with_outside_plugins, "check", str(REPO / "examples" / "arithmetic_grpo_lora.yaml"),
                   f"actor.path={tiny_qwen2}", "actor.backend=archon", check=False)
    assert result.returncode == 1
    assert "archon has no LoRA support: archon trains full weights only" in result.stderr


def test_wrapper_runs_around_another_plugins_export(with_outside_plugins, tmp_path):
    venv, env = with_outside_plugins
    events = tmp_path / "events.jsonl"
    code = ("from areal_core.registry import default_registry\n"
            "r = default_registry().call('areal_export_adapter', 'toy', engine=None, directory='/tmp/x', version=7)\n"
            "print(r.version)\n")
    out = sh(venv / "bin" / "python", "-c", code, env={**env, "TOY_EVENTS": str(events)})
    assert out.stdout.strip() == "7"
    assert [json.loads(line) for line in events.read_text().splitlines()] == [
        ["audit before", "toy"], ["toy export", 7], ["audit after", 7]]
