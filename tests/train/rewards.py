"""A reward a random tiny model earns often enough for GRPO to have something to learn from
(the arithmetic reward is always 0 on an untrained model, so its gradients would all be zero)."""


def first_token_is_low_digit(prompt_record, completion_ids) -> float:
    """1.0 when the completion starts with one of the token ids of the digits 0-4."""
    return 1.0 if completion_ids and 4 <= completion_ids[0] <= 8 else 0.0
