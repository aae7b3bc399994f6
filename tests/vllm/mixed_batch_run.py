"""A program (not a test module): serial versus mixed-batch LoRA results with the offline ``vllm.LLM``.

Run by ``test_mixed_batch.py`` in a fresh process per case, because vLLM loads its plugins once
per process and ``VLLM_PLUGINS`` decides which. Usage::

    python mixed_batch_run.py MODEL_DIR ADAPTER_A ADAPTER_B OUT_JSON

It generates greedily for prompts x {base, a, b}: first each request alone (serial), then all of
them as one ``generate`` call with one LoRA request per prompt (None for base), which vLLM
schedules as one mixed batch. The engine runs in this process (no multiprocessing), so the
result also says whether the areal mixed-batch fix was applied here. ``forced`` measures what the
adapters do: for each prompt, the log-probabilities of the base model's serial completion
teacher-forced (one request at a time) under base, a and b.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main(model: str, adapter_a: str, adapter_b: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model, dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=2,
              max_model_len=128, max_num_seqs=16, enforce_eager=True,
              kv_cache_memory_bytes=64 * 1024 * 1024, seed=0)
    adapters = {"base": None, "a": LoRARequest("a", 1, adapter_a), "b": LoRARequest("b", 2, adapter_b)}
    prompts = [[1, 4 + i, 17, 5 + 2 * i, 15, 6 + i] for i in range(4)]
    requests = [(prompt, kind) for prompt in prompts for kind in adapters]  # base, a, b, base, ...
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

    def run(batch):
        outputs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], params,
                               lora_request=[adapters[kind] for _, kind in batch], use_tqdm=False)
        return [{"ids": list(o.outputs[0].token_ids),
                 "logprobs": [next(iter(step.values())).logprob for step in o.outputs[0].logprobs]}
                for o in outputs]

    serial = [run([request])[0] for request in requests]
    mixed = run(requests)

    score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def forced(prompt, completion, kind):
        sequence = prompt + completion
        scored = llm.generate([{"prompt_token_ids": sequence}], score, lora_request=[adapters[kind]],
                              use_tqdm=False)[0].prompt_logprobs
        return [scored[i][token].logprob for i, token in enumerate(sequence) if i >= len(prompt)]

    base_completions = [s["ids"] for (_, kind), s in zip(requests, serial) if kind == "base"]
    teacher_forced = [{kind: forced(prompt, completion, kind) for kind in adapters}
                      for prompt, completion in zip(prompts, base_completions)]
    from areal_vllm.mixed_batch_fix import is_applied

    with open(out, "w") as handle:
        json.dump({"kinds": [kind for _, kind in requests], "serial": serial, "mixed": mixed,
                   "forced": teacher_forced, "fix_applied": is_applied()}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:5])
