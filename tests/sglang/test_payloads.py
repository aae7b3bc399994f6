"""The JSON bodies the SGLang client builds, and how it reads SGLang's answers (no server)."""

from __future__ import annotations

import pytest

from areal_core.errors import ArealError
from areal_core.interfaces import SamplingParams
from areal_sglang import payloads


def test_generate_payload_names_the_version_and_asks_for_logprobs():
    body = payloads.generate_payload(
        [1, 5, 6], lora_name="lora-v3", n=4,
        sampling=SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=5, stop_token_ids=(2,)),
    )
    assert body == {
        "input_ids": [1, 5, 6],
        "sampling_params": {"max_new_tokens": 7, "temperature": 0.8, "top_p": 0.9, "n": 4,
                            "top_k": 5, "stop_token_ids": [2]},
        "return_logprob": True,
        "lora_path": "lora-v3",
    }


def test_seeded_samples_each_get_their_own_seed():
    # SGLang's seeded sampling hashes (seed, position): one seed for n samples gives n copies.
    body = payloads.generate_payload([1, 5], lora_name="lora-v1", n=3, prompt_index=2,
                                     sampling=SamplingParams(seed=11))
    assert body["input_ids"] == [[1, 5]] * 3 and body["lora_path"] == "lora-v1"
    seeds = [params["sampling_seed"] for params in body["sampling_params"]]
    assert seeds == payloads.sample_seeds(11, 2, 3) and len(set(seeds)) == 3
    assert all(params["n"] == 1 for params in body["sampling_params"])
    assert set(seeds).isdisjoint(payloads.sample_seeds(11, 3, 3))  # other prompts, other seeds
    single = payloads.generate_payload([1, 5], lora_name="lora-v1", n=1, sampling=SamplingParams(seed=11))
    assert single["input_ids"] == [1, 5] and single["sampling_params"]["sampling_seed"] == seeds[0] - 2 * 10_007


def test_sampling_switches_that_are_off_are_left_out():
    fields = payloads.sampling_fields(SamplingParams(), n=1)
    assert "top_k" not in fields and "stop_token_ids" not in fields and "sampling_seed" not in fields
    assert "ignore_eos" not in fields


def test_ignore_eos_is_sglangs_own_sampling_field():
    fields = payloads.sampling_fields(SamplingParams(max_new_tokens=128, ignore_eos=True), n=8)
    assert fields["ignore_eos"] is True and fields["max_new_tokens"] == 128


def test_prompt_logprobs_payload_scores_from_the_first_token_and_generates_nothing():
    body = payloads.prompt_logprobs_payload([1, 2, 3], lora_name="lora-v0")
    assert body["logprob_start_len"] == 0 and body["sampling_params"]["max_new_tokens"] == 0
    assert body["lora_path"] == "lora-v0" and body["return_logprob"] is True


@pytest.mark.parametrize("lora_name", [None, "", [None, "lora-v1"], []])
def test_a_generate_request_without_an_adapter_version_is_refused(lora_name):
    with pytest.raises(ArealError, match="lora_path"):
        payloads.require_lora_path({"input_ids": [1], "lora_path": lora_name})
    with pytest.raises(ArealError, match="base model"):
        payloads.require_lora_path({"input_ids": [1]})


def test_generate_payload_refuses_an_empty_name():
    with pytest.raises(ArealError):
        payloads.generate_payload([1], lora_name="", n=1, sampling=SamplingParams())


def test_read_completion_takes_ids_and_logprobs_from_the_logprob_entries():
    answer = {
        "output_ids": [9, 2],
        "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                      "output_token_logprobs": [[-0.5, 9, None], [-1.25, 2, None]]},
    }
    assert payloads.read_completion(answer) == ((9, 2), (-0.5, -1.25), "stop")


def test_read_completion_refuses_disagreeing_ids_and_aborted_requests():
    answer = {"output_ids": [9, 3], "meta_info": {"finish_reason": {"type": "length"},
                                                  "output_token_logprobs": [[-0.5, 9, None], [-1.0, 2, None]]}}
    with pytest.raises(ArealError, match="disagree"):
        payloads.read_completion(answer)
    aborted = {"meta_info": {"finish_reason": {"type": "abort", "message": "out of memory"}}}
    with pytest.raises(ArealError, match="out of memory"):
        payloads.read_completion(aborted)


def test_read_prompt_logprobs_drops_the_first_token_and_checks_the_count():
    answer = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-2.0, 5, None], [-3.0, 6, None]]}}
    assert payloads.read_prompt_logprobs(answer, 2) == [-2.0, -3.0]
    with pytest.raises(ArealError, match="expected 3"):
        payloads.read_prompt_logprobs(answer, 3)


def test_load_and_unload_payloads():
    assert payloads.load_payload("lora-v1", "/adapters/v1") == {"lora_name": "lora-v1", "lora_path": "/adapters/v1"}
    assert payloads.unload_payload("lora-v1") == {"lora_name": "lora-v1"}
