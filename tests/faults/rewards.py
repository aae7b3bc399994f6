"""A reward that gives every GRPO group of a random tiny model something to learn from."""


def first_token_id(prompt_record, completion_ids) -> float:
    """The completion's first token id, scaled to [0, 1): samples that start differently score
    differently, so a group's advantages are non-zero whenever its samples differ at all (the
    arithmetic reward is 0 on every sample of an untrained model: no gradient, no update)."""
    return completion_ids[0] / 64.0 if completion_ids else 0.0
