"""The chunked log-probability head gives the full-logits answer, values and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from areal_fsdp2 import logprob_head  # noqa: E402
from areal_fsdp2.logprobs import forward_logits, sequence_logprobs  # noqa: E402

SEQUENCES = [[1, 5, 6, 7, 8, 9, 3], [1, 9, 10, 11], [1, 4, 4, 4, 4, 4, 4, 2, 7, 7]]


def load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def logprobs_and_grads(model, head):
    model.zero_grad()
    rows = sequence_logprobs(model, SEQUENCES, 0, torch.device("cpu"), head)
    loss = -sum((row * (index + 1)).sum() for index, row in enumerate(rows))
    loss.backward()
    return [row.detach() for row in rows], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_head_matches_whole_logits(tiny_qwen2, monkeypatch, recompute):
    model = load(tiny_qwen2)
    expected, expected_grads = logprobs_and_grads(model, None)
    head = logprob_head.install(model, recompute=recompute)
    assert head is not None and model.lm_head is head
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # Chunks of 3 tokens: several chunks per row, and chunks that straddle rows.
    monkeypatch.setattr(logprob_head, "CHUNK_ELEMENTS", 3 * head.out_features)
    got, grads = logprobs_and_grads(model, head)
    for row, want in zip(got, expected):
        torch.testing.assert_close(row, want, rtol=0, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_targets_the_head_gives_logits(tiny_qwen2):
    model = load(tiny_qwen2)
    before = forward_logits(model, SEQUENCES, 0, torch.device("cpu"))
    logprob_head.install(model, recompute=True)
    after = forward_logits(model, SEQUENCES, 0, torch.device("cpu"))
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_not_installed_on_unknown_architectures_or_wrapped_heads(tiny_qwen2):
    model = load(tiny_qwen2)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert logprob_head.install(model, recompute=False) is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40))
    assert logprob_head.install(gpt2, recompute=False) is None
