"""Each loss variant, the reward shaping and the learning-rate schedule against small references
computed by hand from their formulas (docs/rl-options.md).

Tolerances: in float64 the implementation and the reference differ only by the order of a few
roundings of O(1) values: 1e-12 relative is ~4,500 ulps (2.2e-16) and far below any wrong branch,
which moves a value by >= 0.02 (the smallest gap between a clipped and an unclipped term below).
In float32 (what the engines hand the loss), a few exp/mul/max of O(1) values carry ~10 ulps of
1.2e-7: 1e-5 relative keeps a 100x margin and still sits 2,000x below the 0.02 a wrong branch moves.
"""

import math

import pytest
import torch

from areal_core.config import ActorConfig, NormConfig, OptimizerConfig
from areal_core.grpo.advantages import batch_advantages, normalise, overlong_penalty, shaped_rewards
from areal_core.grpo.batch import TrainItem
from areal_core.grpo.loss import Objective, make_grpo_loss, objective_metrics, sequence_scales, token_losses
from areal_core.lr_schedule import learning_rate, warmup_steps

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = list(TOLERANCE)


def run(objective, new, behaviour, advantage, proximal=None, reference=None, dtype=torch.float64):
    """The per-token loss and d(sum loss)/d(new) of the implementation."""
    new = torch.tensor(new, dtype=dtype, requires_grad=True)
    as_tensor = lambda v: None if v is None else torch.tensor(v, dtype=dtype)  # noqa: E731
    loss, stats = token_losses(new, as_tensor(behaviour), advantage, objective, as_tensor(proximal),
                               as_tensor(reference))
    loss.sum().backward()
    return loss.detach().tolist(), new.grad.tolist(), stats


def close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= tol * max(1.0, abs(e)), (actual, expected)


# --- PPO clip, clip-higher and dual clip ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric_clip_with_a_positive_advantage(dtype):
    # ratios e^0.1 (inside), e^0.3 = 1.35 (above 1.2: clipped, no gradient), e^-0.3 = 0.74 (below
    # 0.8 but A > 0: the unclipped term is the max, the gradient flows)
    loss, grad, stats = run(Objective(eps_clip=0.2), [-1.0, -0.5, -2.3], [-1.1, -0.8, -2.0], 1.0, dtype=dtype)
    r1, r3 = math.exp(0.1), math.exp(-0.3)
    close(loss, [-r1, -1.2, -r3], dtype)
    close(grad, [-r1, 0.0, -r3], dtype)
    assert stats["clipped"] == 1 and stats["tokens"] == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric_clip_with_a_negative_advantage(dtype):
    # A = -1: the loss is max(r, clip(r)): 1.35 stays (unclipped, gradient r), 0.74 becomes 0.8
    loss, grad, stats = run(Objective(eps_clip=0.2), [-1.0, -0.5, -2.3], [-1.1, -0.8, -2.0], -1.0, dtype=dtype)
    r1, r2 = math.exp(0.1), math.exp(0.3)
    close(loss, [r1, r2, 0.8], dtype)
    close(grad, [r1, r2, 0.0], dtype)
    assert stats["clipped"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_higher_raises_only_the_upper_bound(dtype):
    # eps_clip 0.2, eps_clip_higher 0.28: e^0.2 = 1.221 passes (it is clipped at 1.2 when symmetric),
    # e^0.3 = 1.350 is clipped at 1.28; the lower bound stays 0.8 (A = -1, ratio e^-0.3)
    high = Objective(eps_clip=0.2, eps_clip_higher=0.28)
    loss, grad, _ = run(high, [-1.0, -0.5], [-1.2, -0.8], 1.0, dtype=dtype)
    close(loss, [-math.exp(0.2), -1.28], dtype)
    close(grad, [-math.exp(0.2), 0.0], dtype)
    symmetric, _, _ = run(Objective(eps_clip=0.2), [-1.0], [-1.2], 1.0, dtype=dtype)
    close(symmetric, [-1.2], dtype)
    loss, grad, _ = run(high, [-2.3], [-2.0], -1.0, dtype=dtype)
    close(loss, [0.8], dtype)
    close(grad, [0.0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_clip_bounds_the_loss_of_negative_advantages(dtype):
    # A = -1, ratio e^1.5 = 4.48: PPO's max(r, clip r) = 4.48 exceeds c_clip |A| = 3 -> 3, no gradient;
    # ratio e^0.3 = 1.35 stays. A positive advantage is untouched by the dual clip.
    dual = Objective(eps_clip=0.2, c_clip=3.0)
    loss, grad, stats = run(dual, [-0.5, -0.5], [-2.0, -0.8], -1.0, dtype=dtype)
    close(loss, [3.0, math.exp(0.3)], dtype)
    close(grad, [0.0, math.exp(0.3)], dtype)
    assert stats["dual_clipped"] == 1
    loss, grad, stats = run(dual, [-0.5], [-2.0], 1.0, dtype=dtype)
    close(loss, [-1.2], dtype)
    assert stats["dual_clipped"] == 0


# --- the old policy: behaviour, recomputed, decoupled ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_recomputed_logprobs_replace_the_behaviour_ones_in_the_ratio(dtype):
    loss, grad, stats = run(Objective(eps_clip=0.2), [-1.0], [-3.0], 1.0, proximal=[-1.1], dtype=dtype)
    close(loss, [-math.exp(0.1)], dtype)  # against the server's -3.0 the ratio would be e^2, clipped
    close(grad, [-math.exp(0.1)], dtype)
    assert stats["behav_kept"] == 0  # no behaviour weight without the decoupled loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoupled_loss_weights_by_proximal_over_behaviour_and_drops_tokens_above_the_cap(dtype):
    # proximal - behaviour = 0.2, 1.0, -0.1: weights e^0.2, e^1 = 2.72 (> cap 2: dropped), e^-0.1;
    # the ratios against the proximal policy: e^0.1 (inside), e^0.1, e^0.3 (clipped at 1.2)
    objective = Objective(eps_clip=0.2, use_decoupled_loss=True, behav_imp_weight_cap=2.0)
    new, proximal, behaviour = [-1.0, -1.0, -1.0], [-1.1, -1.1, -1.3], [-1.3, -2.1, -1.2]
    loss, grad, stats = run(objective, new, behaviour, 1.0, proximal=proximal, dtype=dtype)
    w1, w3 = math.exp(0.2), math.exp(-0.1)
    close(loss, [-w1 * math.exp(0.1), 0.0, -w3 * 1.2], dtype)
    close(grad, [-w1 * math.exp(0.1), 0.0, 0.0], dtype)
    assert (stats["behav_kept"], stats["behav_capped"]) == (2, 1)
    assert abs(stats["behav_weight_sum"] - (w1 + w3)) < 1e-5
    metrics = objective_metrics(stats, decoupled=True)
    assert abs(metrics["behav_weight_mean"] - (w1 + w3) / 2) < 1e-5
    assert metrics["behav_capped_fraction"] == pytest.approx(1 / 3)
    # without a cap every weight is applied
    loss, _, stats = run(Objective(use_decoupled_loss=True), new, behaviour, 1.0, proximal=proximal, dtype=dtype)
    close(loss, [-w1 * math.exp(0.1), -math.e * math.exp(0.1), -w3 * 1.2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_k3_kl_to_the_base_policy(dtype):
    # ratio 1 (new = behaviour), A = 0: only the KL term; d = ref - new = -0.5:
    # kl = e^d - d - 1, d kl / d new = 1 - e^d
    loss, grad, stats = run(Objective(kl_ctl=0.1), [-1.0], [-1.0], 0.0, reference=[-1.5], dtype=dtype)
    d = -0.5
    close(loss, [0.1 * (math.exp(d) - d - 1)], dtype)
    close(grad, [0.1 * (1 - math.exp(d))], dtype)
    assert abs(stats["kl_sum"] - (math.exp(d) - d - 1)) < 1e-6


# --- aggregation --------------------------------------------------------------------------------------------


def test_sequence_scales_of_each_aggregation():
    lengths = [2, 4]
    assert sequence_scales(lengths, "token-mean", 8) == [1 / 6, 1 / 6]
    assert sequence_scales(lengths, "seq-mean-token-mean", 8) == [1 / 4, 1 / 8]
    assert sequence_scales(lengths, "seq-mean-token-sum-norm", 8) == [1 / 16, 1 / 16]
    with pytest.raises(ValueError, match="loss_agg_mode"):
        sequence_scales(lengths, "sum", 8)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_a_loss_function_adds_each_sequences_tokens_with_its_scale(mode):
    # two sequences of completion lengths 1 and 3, ratios all 1 (new = behaviour), A = +1 and -1:
    # per-token losses -1 and +1; e.g. seq-mean-token-mean: (-1 / 1 + 3 / 3) / 2 = 0
    items = [TrainItem((1, 7), 1, (-1.0,), 0, 1.0, 1.0), TrainItem((1, 7, 7, 7), 1, (-1.0,) * 3, 0, 0.0, -1.0)]
    scales = sequence_scales([1, 3], mode, 4)
    loss_fn = make_grpo_loss(items, objective=Objective(), scales=scales)
    logprobs = [torch.full((len(item.tokens) - 1,), -1.0, dtype=torch.float64, requires_grad=True) for item in items]
    loss, metrics = loss_fn(logprobs, [0, 1])
    expected = {"token-mean": (-1 + 3) / 4, "seq-mean-token-mean": 0.0, "seq-mean-token-sum-norm": (-1 + 3) / 8}[mode]
    assert abs(float(loss.detach()) - expected) < 1e-12
    loss.backward()
    assert abs(float(logprobs[0].grad[0]) - (-scales[0])) < 1e-12  # d(-r)/d new = -r = -1, times the scale
    assert abs(float(logprobs[1].grad[0]) - scales[1]) < 1e-12
    assert metrics["tokens"] == 4 and "loss" not in metrics


# --- rewards and advantages --------------------------------------------------------------------------------


def test_overlong_penalty_is_zero_then_linear_over_the_last_tokens():
    # max_new_tokens 10, the last 4 penalised, factor 1: lengths 6 -> 0, 8 -> -2/4, 10 -> -1
    assert [overlong_penalty(n, 10, 4, 1.0) for n in (3, 6, 7, 8, 10)] == [0.0, 0.0, -0.25, -0.5, -1.0]


def test_reward_bias_scaling_and_clip():
    actor = ActorConfig(reward_bias=-0.5, reward_scaling=10.0, reward_clip=4.0)
    out = shaped_rewards([1.0, 0.0, 0.8], [3, 3, 3], actor, 10)
    assert out[:2] == [4.0, -4.0] and abs(out[2] - 3.0) < 1e-12  # (0.8 - 0.5) x 10


def test_group_normalisation_by_hand():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, population std 0.5 -> +-1/(0.5 + eps) ~ +-2
    # group 1: all equal -> zeros
    rewards = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    lengths = [[3] * 4, [3] * 4]
    out = batch_advantages(rewards, lengths, ActorConfig(), 8)
    assert out[1] == [0.0] * 4
    expected = 0.5 / (0.5 + 1e-4)
    assert all(abs(a - e) < 1e-12 for a, e in zip(out[0], [expected, -expected, -expected, expected]))
    # n - 1: std sqrt(1/3)
    unbiased = ActorConfig(reward_norm=NormConfig(std_unbiased=True, eps=1e-5))
    out = batch_advantages(rewards, lengths, unbiased, 8)
    assert abs(out[0][0] - 0.5 / (math.sqrt(1 / 3) + 1e-5)) < 1e-12


def test_dr_grpo_mean_centring_and_batch_normalisation():
    rewards = [[1.0, 0.0], [1.0, 1.0]]
    lengths = [[1, 3], [2, 2]]
    # Dr. GRPO: centred within the group, not scaled
    dr = ActorConfig(reward_norm=NormConfig(mean_level="group", std_level=None))
    assert batch_advantages(rewards, lengths, dr, 8) == [[0.5, -0.5], [0.0, 0.0]]
    # by batch: mean 0.75, population std sqrt(3/16) over the four samples
    batch = ActorConfig(reward_norm=NormConfig(mean_level="batch", std_level="batch", eps=1e-4))
    std = math.sqrt(3 / 16)
    out = batch_advantages(rewards, lengths, batch, 8)
    assert all(abs(a - e) < 1e-12 for a, e in zip(out[0] + out[1], [(r - 0.75) / (std + 1e-4) for r in (1, 0, 1, 1)]))
    # adv_norm over tokens: lengths weigh; with no reward_norm, values 1, 0, 1, 1 weigh 1, 3, 2, 2 tokens:
    # mean 5/8; variance (1*(3/8)^2 + 3*(5/8)^2 + 4*(3/8)^2) / 8 = 15/64
    tokens = ActorConfig(reward_norm=None, adv_norm=NormConfig(mean_level="batch", std_level="batch", eps=1e-4))
    out = batch_advantages(rewards, lengths, tokens, 8)
    std = math.sqrt(15 / 64)
    assert all(abs(a - e) < 1e-12 for a, e in zip(out[0] + out[1], [(r - 5 / 8) / (std + 1e-4) for r in (1, 0, 1, 1)]))


def test_normalise_scales_without_centring_when_asked():
    norm = NormConfig(mean_level=None, std_level="batch", eps=0.0 + 1e-9)
    out = normalise([2.0, 4.0], [0, 0], [1.0, 1.0], norm)
    assert all(abs(a - e) < 1e-6 for a, e in zip(out, [2.0, 4.0]))  # std 1 about the mean 3


# --- the learning-rate schedule -------------------------------------------------------------------------


def test_warmup_then_cosine_and_linear_by_hand():
    cosine = OptimizerConfig(lr=1.0, lr_scheduler_type="cosine", warmup_steps_proportion=0.2, min_lr_ratio=0.1)
    assert warmup_steps(cosine, 10) == 2
    rates = [learning_rate(cosine, k, 10) for k in range(10)]
    # k 0, 1: warm-up 1/2, 2/2; then t = (k - 2) / 8: cosine from 1 towards 0.1
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(2, 10)]
    assert all(abs(a - e) < 1e-12 for a, e in zip(rates, expected))
    assert abs(rates[6] - 0.55) < 1e-12  # halfway: the mean of 1 and 0.1
    linear = OptimizerConfig(lr=2.0, lr_scheduler_type="linear")
    assert [learning_rate(linear, k, 4) for k in range(4)] == [2.0, 1.5, 1.0, 0.5]
    constant = OptimizerConfig(lr=3.0, warmup_steps_proportion=0.5)
    assert [learning_rate(constant, k, 4) for k in range(4)] == [1.5, 3.0, 3.0, 3.0]
    # a proportion too small for one whole step gives W = 1: no step below the full rate
    tiny = OptimizerConfig(lr=1.0, warmup_steps_proportion=0.001)
    assert learning_rate(tiny, 0, 40) == 1.0
