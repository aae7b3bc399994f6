"""The chunked log-probability head gives the full-logits answer, values and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from areal_core.testing.numerics import assert_close_to_norm  # noqa: E402
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
    # Both sides compute in float32 (u = 2^-24 = 6e-8) in other summation orders (other matrix
    # shapes), so they agree up to rounding relative to the size of what is compared, never
    # element by element. Measured under ATEN_CPU_CAPABILITY default, avx2 and avx512:
    # log-probabilities (|lp| up to 5.1) at most 4.8e-7 off, 1.6 u of the largest; gradients at
    # most 8.5e-7 (14 u) off in norm, per tensor (a bias; the tied embedding, values up to 75,
    # 2.2e-7 = 4 u, while one of its elements moves by 1.5e-5 to 1.9e-5 with the CPU). A chunk
    # whose gradient is lost moves the embedding's by 7.5e-2 (1.2e6 u) and others' by up to 0.33;
    # a target read from the wrong position moves log-probabilities by O(1). Bounds of 64 u and
    # 256 u leave 40x and 18x over the noise and a factor >= 5000 under those bugs.
    assert_close_to_norm(got, expected, ulps=64, norm="max", msg="log-probabilities")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close_to_norm(grad, expected_grads[name], ulps=256, msg=name)


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
