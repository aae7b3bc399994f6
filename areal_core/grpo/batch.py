"""From rollouts to the training batch every rank receives.

A ``TrainItem`` is one sampled completion, self-contained: the token sequence (prompt +
completion), where the completion starts, the behaviour log-probabilities the server reported for
each completion token, the version that produced it, and its advantage. Rank 0 builds the list and
broadcasts it; each rank trains on its share.
"""

from __future__ import annotations

import attrs

from areal_core.interfaces import Sample


@attrs.frozen
class TrainItem:
    tokens: tuple[int, ...]
    prompt_len: int
    behaviour_logprobs: tuple[float, ...]
    version: int
    reward: float
    advantage: float

    @property
    def num_completion_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len


def build_items(groups: list[list[Sample]], rewards: list[list[float]],
                advantages: list[list[float]]) -> list[TrainItem]:
    """One item per sample (``areal_core.grpo.advantages`` gives the advantages).

    Samples with no generated token carry no loss and are dropped.
    """
    items = []
    for samples, group_rewards, group_advantages in zip(groups, rewards, advantages):
        for sample, reward, advantage in zip(samples, group_rewards, group_advantages):
            if not sample.output_ids:
                continue
            if len(sample.logprobs) != len(sample.output_ids):
                raise ValueError(
                    f"server returned {len(sample.logprobs)} log-probabilities for "
                    f"{len(sample.output_ids)} generated tokens"
                )
            items.append(TrainItem(
                tokens=tuple(sample.prompt_ids) + tuple(sample.output_ids),
                prompt_len=len(sample.prompt_ids),
                behaviour_logprobs=tuple(sample.logprobs),
                version=sample.version,
                reward=reward,
                advantage=advantage,
            ))
    return items


def shard_for_rank(items: list[TrainItem], rank: int, world_size: int) -> list[TrainItem]:
    """This rank's share: items rank, rank + world_size, ... (balanced by count)."""
    return items[rank::world_size]
