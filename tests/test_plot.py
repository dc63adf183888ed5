"""plot.py: a training log becomes a non-empty PNG; a broken log line is a clear error naming file and line."""
import json

import pytest

from plot import plot_training_log


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
