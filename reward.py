"""WaltzRL rewards: R_c for the conversation agent, the gated R_f for the feedback agent.

The method is explained in docs/method.md ("Rewards"); this file is its reward section in code.

Rewards for one feedback round t (the paper uses a single round, T_max = 1):

    R_c(c_t)       = 1 if the judge says c_t is neither unsafe nor overrefusing, else 0
    R_dir(f_t)     = R_c(c_{t+1}) - R_c(c_t)        (Dynamic Improvement Reward; 0 without a revision)
    R_label(f_t)   = 1 if the feedback agent's (unsafe, overrefuse) both equal the judge's labels of c_t
    R_format(f_t)  = 1 if the feedback output parses (feedback_json.py)
    R_f            = alpha * R_dir * R_label  +  lambda * R_label  +  gamma * R_format

The gate. DIR is multiplied by R_label so that the feedback agent is paid for improvement only when
it also diagnosed the answer correctly. Without the gate, DIR pays for any feedback that happens to
trigger a fixing revision whatever its labels say (say, calling an unsafe answer overrefusing), so
the labels stop mattering, and in stage 2 (lambda = 0) nothing would reward them at all; the paper
reports label accuracy collapses. With the gate, negative DIR can only occur with wrong labels (a
correct "ok" never triggers a revision), so with correct labels R_dir is 0 or 1.

Stages. Stage 1 trains only the feedback agent with lambda = 1 (all three terms). Stage 2 trains
both agents with lambda = 0: as the conversation agent improves, "ok" labels dominate and the
additive label reward overfits to them; the gate (alpha * R_dir * R_label) stays.

Coefficients are not published. Our defaults: alpha = 1.0, lambda = 1.0 (stage 1) / 0.0 (stage 2),
gamma = 0.1. Worked cases with these defaults (stage 1 -> stage 2):
    good c_0, correct "ok" (no revision)          0 + 1 + 0.1 = 1.1  ->  0.1
    bad c_0, correct flag, revision fixes it       1 + 1 + 0.1 = 2.1  ->  1.1
    bad c_0, correct flag, revision still bad      0 + 1 + 0.1 = 1.1  ->  0.1
    good c_0, false alarm (DIR -1 or 0, gated)     0 + 0 + 0.1 = 0.1  ->  0.1
    bad c_0, missed (no revision)                  0 + 0 + 0.1 = 0.1  ->  0.1
    unparseable feedback                           0                  ->  0

The feedback agent's labels come from its JSON output, read by feedback_json.parse_feedback (None when it does
not parse: R_label = R_format = 0).
"""
from __future__ import annotations

from typing import NamedTuple

from nanowaltz.judge import Labels  # the judge's output: what every reward is computed from

DEFAULT_ALPHA = 1.0
LAMBDA_STAGE1 = 1.0
LAMBDA_STAGE2 = 0.0
DEFAULT_GAMMA = 0.1


# ----------------------------------------------------------------------------- rewards



def conversation_reward(labels: Labels) -> float:
    """R_c: 1 for a response the judge calls neither unsafe nor overrefusing. No helpfulness term."""
    return 1.0 if labels.ok else 0.0


def dynamic_improvement_reward(before: Labels, after: Labels | None) -> float:
    """R_dir = R_c(c_{t+1}) - R_c(c_t), in {-1, 0, 1}; 0 when no revision happened (after is None)."""
    if after is None:
        return 0.0
    return conversation_reward(after) - conversation_reward(before)


def label_reward(predicted: Labels | None, judged: Labels) -> float:
    """R_label: 1 when both predicted labels match the judge's; unparseable feedback (None) gets 0."""
    return 1.0 if predicted is not None and predicted == judged else 0.0


def format_reward(predicted: Labels | None) -> float:
    """R_format: 1 when the feedback output parsed (parse_feedback returned labels)."""
    return 0.0 if predicted is None else 1.0


class FeedbackRewardParts(NamedTuple):
    """The terms of R_f for logging. `dir` is the raw (ungated) DIR; `total` applies the gate."""

    dir: float
    label: float
    format: float
    total: float


def feedback_reward_parts(predicted: Labels | None, judged_before: Labels, judged_after: Labels | None,
                          alpha: float = DEFAULT_ALPHA, lam: float = LAMBDA_STAGE1,
                          gamma: float = DEFAULT_GAMMA) -> FeedbackRewardParts:
    """R_f and its terms. predicted: the feedback agent's labels (None if unparseable);
    judged_before / judged_after: judge labels of c_t and of the revision c_{t+1} (None: no revision)."""
    r_dir = dynamic_improvement_reward(judged_before, judged_after)
    r_label = label_reward(predicted, judged_before)
    r_format = format_reward(predicted)
    total = alpha * r_dir * r_label + lam * r_label + gamma * r_format
    return FeedbackRewardParts(dir=r_dir, label=r_label, format=r_format, total=total)


def feedback_reward(predicted: Labels | None, judged_before: Labels, judged_after: Labels | None,
                    alpha: float = DEFAULT_ALPHA, lam: float = LAMBDA_STAGE1,
                    gamma: float = DEFAULT_GAMMA) -> float:
    """R_f = alpha * R_dir * R_label + lam * R_label + gamma * R_format (see feedback_reward_parts)."""
    return feedback_reward_parts(predicted, judged_before, judged_after, alpha, lam, gamma).total


def trajectory_rewards(traj, alpha: float = DEFAULT_ALPHA, lam: float = LAMBDA_STAGE1,
                       gamma: float = DEFAULT_GAMMA) -> dict:
    """The rewards of one judged trajectory (rollout.Trajectory after rollout.judge_trajectories):
    {"conversation": [R_c(c_0), R_c(c_1), ...], "feedback": [FeedbackRewardParts of f_0, f_1, ...]}.
    Feedback turn t is scored on c_t and, when it triggered one, the revision c_{t+1}."""
    rewards = {"conversation": [conversation_reward(j) for j in traj.judged], "feedback": []}
    for t, parsed in enumerate(traj.parsed):
        after = traj.judged[t + 1] if t + 1 < len(traj.judged) else None
        predicted = parsed.labels if parsed is not None else None
        rewards["feedback"].append(feedback_reward_parts(predicted, traj.judged[t], after, alpha, lam, gamma))
    return rewards
