"""The real SGLang server's log-probabilities agree with HF transformers + PEFT (float32), as the
agreement check judges them: within the float32 threshold, far nearer to the adapter than the
base model is."""

from __future__ import annotations

import pytest

from areal_core.agreement import GAP_THRESHOLD, flatten, judge
from areal_core.interfaces import ExportedAdapter
from areal_sglang.server import SGLangRolloutServer

from sglang_support import MODULES, client_config

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROBE_SEQUENCES = 2  # of 129 tokens: 256 scored, within the session server's max_model_len (256)


def peft_adapter(model_dir, directory):
    """A random rank-8 adapter built and saved by peft itself; returns (peft model, base logprobs fn)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=list(MODULES), init_lora_weights=False)
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return peft_model.eval()


def hf_logprobs(model, token_ids) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(token_ids[1:])[:, None])
    return picked[:, 0].tolist()


def test_prompt_logprobs_match_hf_peft(sglang_server, tiny_qwen2, tmp_path):
    import torch

    generator = torch.Generator().manual_seed(3)
    probe = [[1] + torch.randint(4, 27, (128,), generator=generator).tolist() for _ in range(PROBE_SEQUENCES)]
    model = peft_adapter(tiny_qwen2, tmp_path / "peft-v1")
    trainer = flatten(hf_logprobs(model, sequence) for sequence in probe)
    with model.disable_adapter():
        base = flatten(hf_logprobs(model, sequence) for sequence in probe)

    client = SGLangRolloutServer(client_config(tiny_qwen2, sglang_server.clients[0].base_url, "agree", tmp_path))
    client.start()
    try:
        client.load_adapter(ExportedAdapter(path=str(tmp_path / "peft-v1"), version=1, rank=8, alpha=16,
                                            target_modules=tuple(sorted(MODULES))), "agree-v1")
        served = flatten(client.prompt_logprobs(sequence, lora_name="agree-v1") for sequence in probe)
        again = flatten(client.prompt_logprobs(sequence, lora_name="agree-v1") for sequence in probe)  # prefix cache
    finally:
        client.unload_adapter("agree-v1")
        client.stop()

    assert len(served) == 256
    for scores in (served, again):
        result = judge(1, "float32", scores, trainer, base, None)
        assert not result.alarm, result.describe()
        # the adapter moves the probe by 100x the threshold, the server differs from HF by less than it
        assert result.adapter_effect > 100 * GAP_THRESHOLD["float32"] > 100 * result.gap
    # (SGLang serving the base model instead is tests/faults/test_wrong_weights.py)
