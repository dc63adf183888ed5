"""Tests for the reward functions in reward.py against hand-computed values (docs/method.md, "Rewards").

Every expected number below is written out by hand with its arithmetic in a comment, never computed by
calling the function under test. Notation: OK = Labels(False, False), UNSAFE = Labels(True, False),
OVER = Labels(False, True), BOTH = Labels(True, True).
"""
import dataclasses

import pytest

from reward import (
    DEFAULT_ALPHA,
    DEFAULT_GAMMA,
    LAMBDA_STAGE1,
    LAMBDA_STAGE2,
    FeedbackRewardParts,
    Labels,
    conversation_reward,
    dynamic_improvement_reward,
    feedback_reward,
    feedback_reward_parts,
    format_reward,
    label_reward,
)

OK = Labels(unsafe=False, overrefuse=False)
UNSAFE = Labels(unsafe=True, overrefuse=False)
OVER = Labels(unsafe=False, overrefuse=True)
BOTH = Labels(unsafe=True, overrefuse=True)


def test_labels_is_frozen_and_ok_property():
    assert OK.ok and not UNSAFE.ok and not OVER.ok and not BOTH.ok
    with pytest.raises(dataclasses.FrozenInstanceError):
        OK.unsafe = True
    assert Labels(True, False) == UNSAFE and hash(Labels(True, False)) == hash(UNSAFE)


def test_default_coefficients_are_the_documented_ones():
    assert (DEFAULT_ALPHA, LAMBDA_STAGE1, LAMBDA_STAGE2, DEFAULT_GAMMA) == (1.0, 1.0, 0.0, 0.1)


@pytest.mark.parametrize("labels, expected", [(OK, 1.0), (UNSAFE, 0.0), (OVER, 0.0), (BOTH, 0.0)])
def test_conversation_reward(labels, expected):
    assert conversation_reward(labels) == expected


@pytest.mark.parametrize("before, after, expected", [
    (UNSAFE, OK, 1.0),      # 1 - 0
    (OVER, OK, 1.0),        # 1 - 0
    (BOTH, OK, 1.0),        # 1 - 0
    (OK, OVER, -1.0),       # 0 - 1: a revision that broke a good answer
    (OK, UNSAFE, -1.0),     # 0 - 1
    (OK, OK, 0.0),          # 1 - 1
    (UNSAFE, UNSAFE, 0.0),  # 0 - 0
    (UNSAFE, OVER, 0.0),    # 0 - 0: traded one failure for another
    (OK, None, 0.0),        # no revision
    (UNSAFE, None, 0.0),    # no revision, even though c_0 is bad
])
def test_dynamic_improvement_reward(before, after, expected):
    assert dynamic_improvement_reward(before, after) == expected


@pytest.mark.parametrize("predicted, judged, expected", [
    (OK, OK, 1.0),
    (UNSAFE, UNSAFE, 1.0),
    (BOTH, BOTH, 1.0),
    (UNSAFE, BOTH, 0.0),   # one of two labels right is still 0
    (OVER, UNSAFE, 0.0),
    (OK, UNSAFE, 0.0),
    (None, OK, 0.0),       # unparseable feedback
    (None, UNSAFE, 0.0),
])
def test_label_reward(predicted, judged, expected):
    assert label_reward(predicted, judged) == expected


@pytest.mark.parametrize("predicted, expected", [(OK, 1.0), (BOTH, 1.0), (None, 0.0)])
def test_format_reward(predicted, expected):
    assert format_reward(predicted) == expected


# (name, predicted, judged_before, judged_after, alpha, lam, gamma, expected dir, label, format, total)
FEEDBACK_CASES = [
    # ---- stage 1 defaults: alpha=1, lam=1, gamma=0.1 (the worked cases of docs/method.md)
    ("s1 good c0, correct ok", OK, OK, None, 1.0, 1.0, 0.1,
     0.0, 1.0, 1.0, 1.1),   # 1*0*1 + 1*1 + 0.1*1 = 1.1
    ("s1 bad c0, correct flag, fixed", UNSAFE, UNSAFE, OK, 1.0, 1.0, 0.1,
     1.0, 1.0, 1.0, 2.1),   # 1*1*1 + 1*1 + 0.1*1 = 2.1
    ("s1 overrefusal flagged, fixed", OVER, OVER, OK, 1.0, 1.0, 0.1,
     1.0, 1.0, 1.0, 2.1),   # 1*1*1 + 1 + 0.1 = 2.1
    ("s1 correct flag, not fixed", UNSAFE, UNSAFE, UNSAFE, 1.0, 1.0, 0.1,
     0.0, 1.0, 1.0, 1.1),   # 1*0*1 + 1 + 0.1 = 1.1
    ("s1 correct flag, revised into overrefusal", UNSAFE, UNSAFE, OVER, 1.0, 1.0, 0.1,
     0.0, 1.0, 1.0, 1.1),   # R_c 0 -> 0: 1*0*1 + 1 + 0.1 = 1.1
    ("s1 false alarm, revision breaks it", OVER, OK, OVER, 1.0, 1.0, 0.1,
     -1.0, 0.0, 1.0, 0.1),  # 1*(-1)*0 + 1*0 + 0.1 = 0.1: the gate zeroes the negative DIR
    ("s1 false alarm, revision harmless", UNSAFE, OK, OK, 1.0, 1.0, 0.1,
     0.0, 0.0, 1.0, 0.1),   # 1*0*0 + 0 + 0.1 = 0.1
    ("s1 miss", OK, UNSAFE, None, 1.0, 1.0, 0.1,
     0.0, 0.0, 1.0, 0.1),   # no revision: 0 + 0 + 0.1 = 0.1
    ("s1 half-right flag, fixed anyway", BOTH, UNSAFE, OK, 1.0, 1.0, 0.1,
     1.0, 0.0, 1.0, 0.1),   # DIR 1 but label 0: 1*1*0 + 0 + 0.1 = 0.1
    ("s1 unparseable, no revision", None, UNSAFE, None, 1.0, 1.0, 0.1,
     0.0, 0.0, 0.0, 0.0),   # 0 + 0 + 0.1*0 = 0
    ("s1 unparseable, revision passed anyway", None, UNSAFE, OK, 1.0, 1.0, 0.1,
     1.0, 0.0, 0.0, 0.0),   # 1*1*0 + 0 + 0 = 0
    # ---- stage 2: lam=0, the gate stays
    ("s2 good c0, correct ok", OK, OK, None, 1.0, 0.0, 0.1,
     0.0, 1.0, 1.0, 0.1),   # 1*0*1 + 0*1 + 0.1 = 0.1
    ("s2 bad c0, correct flag, fixed", UNSAFE, UNSAFE, OK, 1.0, 0.0, 0.1,
     1.0, 1.0, 1.0, 1.1),   # 1*1*1 + 0 + 0.1 = 1.1
    ("s2 correct flag, not fixed", UNSAFE, UNSAFE, UNSAFE, 1.0, 0.0, 0.1,
     0.0, 1.0, 1.0, 0.1),   # 0 + 0 + 0.1 = 0.1
    ("s2 false alarm, revision breaks it", OVER, OK, OVER, 1.0, 0.0, 0.1,
     -1.0, 0.0, 1.0, 0.1),  # 1*(-1)*0 + 0 + 0.1 = 0.1
    ("s2 miss", OK, UNSAFE, None, 1.0, 0.0, 0.1,
     0.0, 0.0, 1.0, 0.1),   # 0 + 0 + 0.1 = 0.1
    ("s2 unparseable", None, UNSAFE, None, 1.0, 0.0, 0.1,
     0.0, 0.0, 0.0, 0.0),
    # ---- non-default alpha / gamma / lam
    ("alpha 2 gamma 0.5, fixed", UNSAFE, UNSAFE, OK, 2.0, 1.0, 0.5,
     1.0, 1.0, 1.0, 3.5),   # 2*1*1 + 1*1 + 0.5*1 = 3.5
    ("alpha 2 gamma 0.5, false alarm", OVER, OK, OVER, 2.0, 1.0, 0.5,
     -1.0, 0.0, 1.0, 0.5),  # 2*(-1)*0 + 0 + 0.5 = 0.5
    ("alpha 0.5 lam 0.3 gamma 0, fixed", BOTH, BOTH, OK, 0.5, 0.3, 0.0,
     1.0, 1.0, 1.0, 0.8),   # 0.5*1*1 + 0.3*1 + 0*1 = 0.8
    ("alpha 0.5 lam 0.3 gamma 0, correct ok", OK, OK, None, 0.5, 0.3, 0.0,
     0.0, 1.0, 1.0, 0.3),   # 0 + 0.3 + 0 = 0.3
    ("alpha 3 lam 0 gamma 0.2, unparseable", None, OVER, None, 3.0, 0.0, 0.2,
     0.0, 0.0, 0.0, 0.0),   # 0 + 0 + 0.2*0 = 0
]


@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=[case[0] for case in FEEDBACK_CASES])
def test_feedback_reward_reference_table(case):
    _name, predicted, before, after, alpha, lam, gamma, exp_dir, exp_label, exp_format, exp_total = case
    parts = feedback_reward_parts(predicted, before, after, alpha=alpha, lam=lam, gamma=gamma)
    assert isinstance(parts, FeedbackRewardParts)
    assert (parts.dir, parts.label, parts.format) == (exp_dir, exp_label, exp_format)
    assert parts.total == pytest.approx(exp_total, abs=1e-12)
    assert feedback_reward(predicted, before, after, alpha=alpha, lam=lam, gamma=gamma) == pytest.approx(
        exp_total, abs=1e-12)
    # The parts recombine into the total with the gate applied to DIR.
    assert alpha * parts.dir * parts.label + lam * parts.label + gamma * parts.format == pytest.approx(parts.total)


def test_feedback_reward_defaults_are_stage1():
    # 1*1*1 + 1*1 + 0.1*1 = 2.1 without passing any coefficient
    assert feedback_reward(UNSAFE, UNSAFE, OK) == pytest.approx(2.1)
    assert feedback_reward_parts(UNSAFE, UNSAFE, OK).total == pytest.approx(2.1)


def test_gate_makes_flagging_everything_no_better_than_a_miss():
    """The reason for the gate: a feedback agent that always says UNSAFE on good answers earns only the
    format reward, exactly what a miss earns, whatever the revision does."""
    for after in (OK, OVER, UNSAFE, None):
        assert feedback_reward(UNSAFE, OK, after) == pytest.approx(0.1)  # 0 + 0 + 0.1
