"""plot.py: a training log becomes a non-empty PNG; a broken log line is a clear error naming file and line."""
import json

import pytest

from nanowaltz.plot import PANELS, panel_series, plot_training_log


def test_log_to_png(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"iteration": i, "stage": 1 if i < 3 else 2, "conversation_reward_before": 0.1 * i, "ftr": 0.5,
             "feedback/kl": 0.01 * i, "time_rollout": 3.0} for i in range(1, 5)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = plot_training_log(log)
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_log_line_names_file_and_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 1}\n{"iteration": 2\n')
    with pytest.raises(SystemExit, match=r"log.jsonl:2"):
        plot_training_log(log)


def test_single_agent_log_has_no_feedback_series(tmp_path):
    # train.py --single-agent logs the feedback values as NaN; they must not count as data (blank panels).
    rows = [{"iteration": i, "stage": 2, "feedback_reward": float("nan"), "format_rate": float("nan"),
             "conversation_reward_before": 0.5, "conversation/kl": 0.01 * i, "feedback/kl": None} for i in (1, 2)]
    panels = dict(PANELS)
    assert panel_series(rows, panels["feedback reward"]) == {}
    assert panel_series(rows, panels["KL to reference"]) == {"conversation/kl": [(1, 0.01), (2, 0.02)]}
    assert panel_series(rows, panels["conversation reward"]) == {"conversation_reward_before": [(1, 0.5), (2, 0.5)]}
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json writes NaN, as train.py's log does
    assert open(plot_training_log(log), "rb").read()[:4] == b"\x89PNG"
