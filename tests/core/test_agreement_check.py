"""The agreement check compares the probe tokens that matter and fails on a wrong adapter."""

import math

import pytest

from areal_core.agreement import check_agreement, probe_sequence
from areal_core.errors import AgreementError


def test_equal_within_tolerance_passes_and_reports_the_max():
    assert check_agreement([-1.0, -2.0], [-1.00002, -2.00005], 1e-4, "v1") == pytest.approx(5e-5)


def test_a_difference_on_a_likely_token_fails_naming_the_version():
    with pytest.raises(AgreementError, match="adapter v3.*3e-04|adapter v3.*0.0003"):
        check_agreement([-1.0, -2.0], [-1.0003, -2.0], 1e-4, "adapter v3")


def test_float_noise_on_a_token_the_trainer_rules_out_is_not_compared():
    rare = math.log(4e-4)
    assert check_agreement([-0.5, rare + 1.6e-4], [-0.5, rare], 1e-4, "v2") == 0.0
    with pytest.raises(AgreementError):  # without the floor the same numbers fail
        check_agreement([-0.5, rare + 1.6e-4], [-0.5, rare], 1e-4, "v2", min_probability=0)


def test_length_mismatch_is_an_error():
    with pytest.raises(AgreementError, match="returned 1 log-probabilities"):
        check_agreement([-1.0], [-1.0, -2.0], 1e-4, "v1")


def test_a_probe_with_no_likely_token_is_compared_whole():
    assert check_agreement([-20.0, -21.0], [-20.0, -21.00005], 1e-4, "v1") == pytest.approx(5e-5)
    with pytest.raises(AgreementError):
        check_agreement([-20.0, -21.0], [-20.0, -21.001], 1e-4, "v1")


def test_probe_concatenates_prompts_and_answers():
    records = [{"prompt_ids": [1, 2], "answer_ids": [3]}, {"prompt_ids": [1, 4]}, {"prompt_ids": [1, 5]}]
    assert probe_sequence(records, 5) == [1, 2, 3, 1, 4]
    with pytest.raises(ValueError, match="only 7"):
        probe_sequence(records, 8)
