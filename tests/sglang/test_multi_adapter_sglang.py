"""Several adapters on one real SGLang server (``adapters:``): every adapter's versions live at once.

ONE SGLang server for this module (about 30-60 s to start here), launched by the plugin from a
two-adapter configuration: ``add`` (rank 4 on the attention projections, window 1) and ``sub``
(rank 8 on q_proj, v_proj and the MLP, window 0; its k_proj is left out, which SGLang fills with
zeros in its fused qkv slot). The tests show the launched flags hold both, each adapter's
versions are kept and unloaded on their own, names of other adapters are refused before SGLang
is asked, and a batch that mixes the two adapters answers each request as it is answered alone.
The launch command and the checks without a server: test_multi_adapter_config.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import sys
import threading
from pathlib import Path

import pytest

from areal_core.config import ActorConfig, AdapterConfig, GenerationConfig, RolloutConfig, RunConfig
from areal_core.errors import AdapterLoadError, ArealError
from areal_core.interfaces import ExportedAdapter, SamplingParams
from areal_core.registry import default_registry
from areal_core.testing.numerics import relative_error, unit_roundoff

from sglang_support import record_posts

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = [[1, 7, 15, 8, 29], [1, 12, 9, 20, 5, 18], [1, 25, 4, 11], [1, 30, 16, 6, 22, 10, 13]]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
ADD = AdapterConfig(name="add", lora_rank=4, lora_alpha=8,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], max_head_offpolicyness=1)
SUB = AdapterConfig(name="sub", lora_rank=8, lora_alpha=16,
                    target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                    max_head_offpolicyness=0)
ENTRIES = {adapter.name: adapter for adapter in (ADD, SUB)}


@pytest.fixture(scope="module")
def multi_server(tiny_qwen2, tmp_path_factory):
    """A started ``SGLangRolloutServer`` that launched its own server for ``ADD`` and ``SUB``,
    built through the registry as the core builds it."""
    from areal_sglang.launcher import find_server_python

    try:
        find_server_python()
    except ArealError as exc:
        pytest.fail(f"the SGLang tests need the server venv: {exc}")
    config = RunConfig(
        actor=ActorConfig(path=str(tiny_qwen2), lora_rank=8, device="cpu"),
        rollout=RolloutConfig(backend="sglang", max_model_len=256, max_num_seqs=32, max_concurrent_requests=32,
                              request_timeout=120.0),
        gconfig=GenerationConfig(lora_name="add"),
        adapters=[ADD, SUB],
        output_dir=str(tmp_path_factory.mktemp("sglang-multi-adapter")),
    )
    server = default_registry().build_rollout_server("sglang", config)
    server.start()
    group = server.processes[0].pid
    try:
        yield server
    finally:
        server.stop()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"processes of the SGLang server's group {group} outlived stop()")


@pytest.fixture(scope="module")
def built(tiny_qwen2, tmp_path_factory):
    """``built(adapter, version)``: a random peft adapter of that adapter's rank and modules."""
    from areal_core.testing.peft_adapters import build_peft_adapter

    root = tmp_path_factory.mktemp("multi-adapters")
    cache: dict = {}

    def get(adapter: str, version: int) -> ExportedAdapter:
        if (adapter, version) not in cache:
            entry = ENTRIES[adapter]
            seed = 700 + 100 * list(ENTRIES).index(adapter) + version
            cache[adapter, version] = build_peft_adapter(
                tiny_qwen2, root / f"{adapter}-v{version}", rank=entry.lora_rank, seed=seed, version=version,
                target_modules=list(entry.target_modules))
        return cache[adapter, version]

    return get


def _ids(groups) -> list[tuple[int, ...]]:
    return [sample.output_ids for group in groups for sample in group]


def _launched_command(server) -> list[str]:
    from areal_sglang.launcher import server_command

    return server_command(server.processes[0].spec, "python")


def test_two_adapters_of_different_ranks_and_modules_keep_their_own_versions(multi_server, built):
    server = multi_server
    command = _launched_command(server)
    assert command[command.index("--max-lora-rank") + 1] == "8"  # the larger rank
    assert command[command.index("--max-loaded-loras") + 1] == "5"  # add 3 (window 1) + sub 2 (window 0)
    modules = command[command.index("--lora-target-modules") + 1:command.index("--max-loaded-loras")]
    assert modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    # each adapter's versions from a thread of its own, as the core's publishers do. The adapters
    # are built first, here: transformers' from_pretrained is not thread-safe (two at once can
    # leave a later load in this process with a tied lm_head on the meta device).
    for adapter, versions in (("add", (0, 1, 2)), ("sub", (0, 1))):
        for version in versions:
            built(adapter, version)

    def publish(adapter: str, versions: list[int]) -> None:
        for version in versions:
            server.load_adapter(built(adapter, version), f"{adapter}-v{version}")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(publish, "add", [0, 1, 2]), pool.submit(publish, "sub", [0, 1])]:
            future.result()
    # add keeps its version one behind (window 1), sub none (window 0)
    assert server.loaded_adapters() == ["add-v1", "add-v2", "sub-v1"]
    assert server.adapter_versions["add"].loaded() == {1: "add-v1", 2: "add-v2"}
    assert server.adapter_versions["sub"].loaded() == {1: "sub-v1"}

    answers = {name: _ids(server.generate(PROMPTS, lora_name=name, version=int(name[-1]), n=1, sampling=GREEDY))
               for name in ("add-v1", "add-v2", "sub-v1")}
    assert len({tuple(ids) for ids in answers.values()}) == 3  # three models served

    # retired versions are refused by the client (SGLang would silently reload them)
    for name, version in (("add-v0", 0), ("sub-v0", 0)):
        with pytest.raises(ArealError, match="not a live version"):
            server.generate(PROMPTS, lora_name=name, version=version, n=1, sampling=GREEDY)
    # numbered on their own: sub-v2 after add-v2; names never reused
    server.load_adapter(built("sub", 2), "sub-v2")
    assert server.loaded_adapters() == ["add-v1", "add-v2", "sub-v2"]
    with pytest.raises(AdapterLoadError, match="never reused"):
        server.load_adapter(built("add", 1), "add-v1")


def test_a_name_of_another_adapter_is_refused_before_the_server_is_asked(multi_server, built):
    server = multi_server
    sent = record_posts(server)
    adapter = built("add", 0)
    adapter = ExportedAdapter(path=adapter.path, version=7, rank=adapter.rank, alpha=adapter.alpha,
                              target_modules=adapter.target_modules)
    with pytest.raises(AdapterLoadError, match=r"'mul-v7': it is <adapter>-v<N> for none of the run's adapters "
                                               r"\(add, sub\).*version 7 of add must be loaded as 'add-v7'"):
        server.load_adapter(adapter, "mul-v7")
    for call in (lambda: server.generate(PROMPTS, lora_name="mul-v0", version=0, n=1, sampling=GREEDY),
                 lambda: server.prompt_logprobs(PROMPTS[0], lora_name="mul-v0"),
                 lambda: server.unload_adapter("mul-v0"),
                 lambda: server.generate(PROMPTS, lora_name="add", version=0, n=1, sampling=GREEDY)):
        with pytest.raises(ArealError, match=r"for none of the run's adapters \(add, sub\)"):
            call()
    assert sent == []  # SGLang was never asked
    assert "mul-v7" not in server.loaded_adapters()


def _unit_budget(model_dir) -> float:
    """The float32 rounding budget, in unit roundoffs u of the largest |log p| compared, of one
    log-probability computed twice by correct kernels (alone, and in a batch with other requests
    and the other adapter, where the blocking of each product may differ).

    A dot product of length K rounds by about sqrt(K) u (independent roundings); each of the
    model's ``num_hidden_layers`` layers (attention, MLP, the LoRA paths beside them) and the
    output layer with its log-softmax adds one such error to the residual stream, and the
    log-softmax passes a logit error through at most twice. With a factor 4 for "a few":
    4 * (layers + 1) * sqrt(K), K the longest inner dimension (hidden, MLP width, ranks).
    The tiny Qwen2: 2 layers, hidden 64, MLP 128, ranks 4 and 8 -> 4 * 3 * sqrt(128) = 136 u
    (8.1e-6 of the largest |log p|).
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    k = max(config["hidden_size"], config["intermediate_size"], ADD.lora_rank, SUB.lora_rank)
    return 4 * (config["num_hidden_layers"] + 1) * math.sqrt(k)


def _error_ulps(actual, expected) -> float:
    import torch

    return relative_error(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                          norm="max") / unit_roundoff(torch.float32)


_PREFILL = re.compile(r"Prefill batch.*?#new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)")


def _prefill_batches(log: Path, offset: int) -> list[tuple[int, int, int]]:
    """(#new-seq, #new-token, #cached-token) of each prefill batch SGLang logged after ``offset``."""
    text = log.read_bytes()[offset:].decode(errors="replace")
    return [tuple(map(int, match.groups())) for match in _PREFILL.finditer(text)]


def _tokens(first: int, length: int) -> list[int]:
    """A prompt of ``length`` tokens starting with ``first``: no two requests share a prefix."""
    return [first] + [(7 * first + 3 * j) % 28 + 4 for j in range(length - 1)]


#: (what, adapter, prompt): add's prompts are 50 or 100 tokens long, sub's 3 to 8 (33 in all), so a
#: prefill batch of n tokens (none cached) holds both adapters' requests when n >= 50 and n % 50 != 0
REQUESTS = [("generate", "add", _tokens(4 + i, 50)) for i in range(3)] + \
           [("score", "add", _tokens(7 + i, length)) for i, length in enumerate((50, 100, 100))] + \
           [("generate", "sub", _tokens(10 + i, 3 + i)) for i in range(3)] + \
           [("score", "sub", _tokens(13 + i, 6 + i)) for i in range(3)]
ADD_UNIT = 50


def test_a_batch_mixing_adapters_answers_each_request_as_its_adapter_alone(multi_server, built, tiny_qwen2):
    server = multi_server
    names = {}
    for adapter in ("add", "sub"):
        version = (server.adapter_versions[adapter].latest or 0) + 1
        server.load_adapter(built(adapter, version), f"{adapter}-v{version}")
        names[adapter] = (f"{adapter}-v{version}", version)

    def one(request, barrier=None):
        what, kind, tokens = request
        name, version = names[kind]
        if barrier is not None:  # every request reaches the server at once: its scheduler batches them
            barrier.wait()
        if what == "generate":
            [[sample]] = server.generate([tokens], lora_name=name, version=version, n=1, sampling=GREEDY)
            return sample.output_ids, sample.logprobs
        return (), tuple(server.prompt_logprobs(tokens, lora_name=name))

    log = server.processes[0].log_path
    http = server.clients[0]

    def flush():  # no request reuses a prefix cached by an earlier one
        assert http.post_json("/flush_cache", {}).status_code == 200

    flush()
    start = log.stat().st_size
    alone = [one(request) for request in REQUESTS]  # one request at a time: one adapter per batch
    alone_batches = _prefill_batches(log, start)
    assert [seqs for seqs, _, _ in alone_batches] == [1] * len(REQUESTS), alone_batches

    # Which requests SGLang's scheduler puts in one batch depends on when they arrive: up to 3
    # rounds, until one round had a prefill batch holding both adapters (each round is checked).
    mixed_rounds = []
    for _ in range(3):
        flush()
        start = log.stat().st_size
        barrier = threading.Barrier(len(REQUESTS))
        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            mixed_rounds.append(list(pool.map(lambda request: one(request, barrier), REQUESTS)))
        batches = _prefill_batches(log, start)
        assert sum(seqs for seqs, _, _ in batches) == len(REQUESTS) and all(c == 0 for _, _, c in batches)
        both = [batch for batch in batches if batch[1] > ADD_UNIT and batch[1] % ADD_UNIT]
        if both:
            break
    assert both, f"SGLang never batched the two adapters' requests together (its last prefill batches: {batches})"

    budget = _unit_budget(tiny_qwen2)
    worst = 0.0
    for mixed in mixed_rounds:
        for request, single, batched in zip(REQUESTS, alone, mixed):
            assert batched[0] == single[0], f"{request[:2]}: other tokens when mixed"
            error = _error_ulps(batched[1], single[1])
            worst = max(worst, error)
            assert error <= budget, f"{request[:2]}: log-probs {error:.3g} u off when mixed (budget {budget:.3g} u)"

    # what a slot mix-up would show (a request served with the other adapter's slot): every
    # scored prompt under the other adapter, alone
    other = {"add": "sub", "sub": "add"}
    margins = []
    for (what, kind, tokens), single in zip(REQUESTS, alone):
        if what == "score":
            swapped = server.prompt_logprobs(tokens, lora_name=names[other[kind]][0])
            margins.append(_error_ulps(swapped, single[1]))
    assert min(margins) > 100 * budget, f"a swap would move log-probs by only {min(margins):.3g} u"
    print(f"\nmixed vs alone: worst {worst:.3g} u (budget {budget:.3g} u) over {len(mixed_rounds)} round(s); a "
          f"swapped adapter: smallest {min(margins):.3g} u ({min(margins) / budget:.3g}x the budget) over "
          f"{len(margins)} scored prompts; prefill batches holding both (seqs, tokens, cached): {both}",
          file=sys.stderr)
