"""Tests for bench/learning_study.py: which steps run (and how an interrupted one continues), the table and the targets
computed from eval.py results files written by hand here, and a whole study run end to end with stand-in scripts."""
import json
import sys

import pytest

from bench import learning_study
from bench.learning_study import StudyArgs, collect, steps, targets, write_table


def results_file(path, systems: dict):
    """An eval.py results.json holding only what the study reads: per system ASR and ORR (fractions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"systems": {name: {"metrics": {"ASR": {"value": asr}, "ORR": {"value": orr}}}
                                            for name, (asr, orr) in systems.items()}}))


def test_steps_baselines_then_seed_by_seed_each_system_on_both_test_sets_with_both_judges(tmp_path):
    found = steps(StudyArgs(seeds="0,1", out=str(tmp_path)))
    names = [name for name, _, _ in found]
    assert names[:4] == ["evaluate baselines on eval", "re-judge baselines on eval (default:embedding)",
                         "evaluate baselines on heldout", "re-judge baselines on heldout (default:embedding)"]
    assert names[4:6] == ["train waltzrl seed 0", "train single-agent seed 0"]
    # seed 0's three systems (warmstart, waltzrl, single-agent) x 2 test sets x 2 judges come before seed 1's training
    seed0 = names[6:18]
    assert all("-s0 on " in n for n in seed0) and len(set(seed0)) == 12
    assert {n.split()[1] for n in seed0} == {"warmstart-s0", "waltzrl-s0", "single-agent-s0"}
    assert names[18] == "train waltzrl seed 1"
    assert len(found) == 4 + 2 * (2 + 3 * 2 * 2)
    single = dict((name, command) for name, _, command in found)["train single-agent seed 1"]
    assert "--single-agent" in single and single[single.index("--seed") + 1] == "1"
    heldout = dict((name, command) for name, _, command in found)["evaluate warmstart-s1 on heldout"]
    assert "data/heldout.jsonl" in heldout and str(tmp_path / "waltzrl-s1" / "warmstart") in heldout


def test_an_interrupted_run_resumes_and_one_without_a_checkpoint_starts_over(tmp_path):
    run = tmp_path / "waltzrl-s0"

    def command():
        return dict((name, c) for name, _, c in steps(StudyArgs(seeds="0", methods="waltzrl", out=str(tmp_path))))[
            "train waltzrl seed 0"]

    assert "--resume" not in command() and "--overwrite" not in command()  # nothing there yet
    run.mkdir()
    assert "--overwrite" in command()  # stopped during the warm-start: nothing to resume
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    assert "--resume" in command() and "--overwrite" not in command()


def test_unknown_method_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--methods: unknown"):
        steps(StudyArgs(methods="waltzrl,ppo", out=str(tmp_path)))


def test_table_and_targets_from_results_files(tmp_path):
    ev = tmp_path / "eval" / "heldout"
    results_file(ev / "baselines" / "results.json", {"base": (0.70, 0.02), "untrained-collab": (0.80, 0.04)})
    results_file(ev / "warmstart-s0" / "results.json", {"waltzrl": (0.66, 0.10)})
    results_file(ev / "waltzrl-s0" / "results.json", {"waltzrl": (0.50, 0.08)})  # 30 below, ORR +4: met; RL -16
    results_file(ev / "warmstart-s1" / "results.json", {"waltzrl": (0.60, 0.05)})
    results_file(ev / "waltzrl-s1" / "results.json", {"waltzrl": (0.56, 0.10)})  # 24 below, ORR +6: missed; RL -4
    results_file(ev / "single-agent-s0" / "results.json", {"single-agent": (0.70, 0.04)})
    results_file(ev / "single-agent-s1" / "results.json", {"single-agent": (0.66, 0.10)})
    results_file(tmp_path / "eval-second-judge" / "heldout" / "waltzrl-s0" / "results.json", {"waltzrl": (0.9, 0.0)})
    rows = collect(StudyArgs(out=str(tmp_path)))
    assert rows["untrained"]["heldout"] == pytest.approx((80.0, 4.0))
    assert rows["waltzrl-s0"]["heldout 2nd"] == pytest.approx((90.0, 0.0))
    checks = [(what, ok) for what, ok, _ in targets(rows)]
    assert checks[0] == ("waltzrl-s0: ASR >= 25 points below the untrained pair's, ORR <= 5 points above it", True)
    assert checks[1][1] is False  # seed 1: 24 points below, ORR +6
    assert checks[2] == ("waltzrl-s0: RL stages >= 10 ASR points below its warm-start", True)
    assert checks[3][1] is False  # seed 1: 56 vs 60
    # WaltzRL mean ASR 53 vs single-agent 68 (15 below) at ORR 9 vs 7: higher ORR, so missed
    assert checks[4][1] is False and "ASR 53.0 vs 68.0, ORR 9.0 vs 7.0" in targets(rows)[4][2]
    text = write_table(StudyArgs(out=str(tmp_path)))
    assert "| **waltzrl, mean ± sd of 2 seed(s)** |  | 53.0 ± 4.2 / 9.0 ± 1.4 |" in text
    assert json.loads((tmp_path / "study.json").read_text())["base"]["heldout"] == pytest.approx([70.0, 2.0])


def test_whole_study_runs_its_steps_once_and_continues_after_a_failure(tmp_path, monkeypatch):
    """The steps' commands replaced by a stand-in that writes each step's marker (and fails once on one step): a
    second run continues at the failed step and reruns nothing finished."""
    real_run, calls = learning_study.run_command, []
    fail_once = {"evaluate waltzrl-s0 on eval"}

    def fake_steps(args):
        found = []
        for name, marker, _ in steps(args):
            found.append((name, marker, [sys.executable, "-c",
                                         f"import pathlib; p = pathlib.Path({str(marker)!r}); "
                                         f"p.parent.mkdir(parents=True, exist_ok=True); p.write_text('{{}}')"]))
        return found

    def fake_run(command, name):
        calls.append(name)
        if name in fail_once:
            fail_once.discard(name)
            return 1
        return real_run(command, name)

    args = StudyArgs(seeds="0", methods="waltzrl", out=str(tmp_path))
    monkeypatch.setattr(learning_study, "steps", fake_steps)
    monkeypatch.setattr(learning_study, "run_command", fake_run)
    with pytest.raises(SystemExit, match="step 'evaluate waltzrl-s0 on eval' failed"):
        learning_study.run_steps(args)
    first = list(calls)
    calls.clear()
    learning_study.run_steps(args)
    assert first[-1] == "evaluate waltzrl-s0 on eval" and calls[0] == "evaluate waltzrl-s0 on eval"
    assert not set(first[:-1]) & set(calls)  # nothing finished ran twice
    assert len(first) - 1 + len(calls) == len(steps(args))


def test_ctrl_c_lets_the_running_step_save_and_says_how_to_continue(tmp_path):
    """A terminal's Ctrl-C reaches the step's process and the study alike: the study waits for the step to finish its
    own clean stop (train.py saves a checkpoint then) instead of killing it, and ends with how to continue."""
    import os
    import signal
    import threading
    import time

    saved, started = tmp_path / "saved", tmp_path / "started"
    child = (f"import pathlib, signal, sys, time\n"
             f"def stop(*_):\n"
             f"    time.sleep(0.5); pathlib.Path({str(saved)!r}).write_text('checkpoint'); sys.exit(130)\n"
             f"signal.signal(signal.SIGINT, stop)\n"
             f"pathlib.Path({str(started)!r}).write_text('')\n"
             f"time.sleep(60)\n")
    process = {}
    real_popen = learning_study.subprocess.Popen

    def popen(*args, **kwargs):
        process["child"] = real_popen(*args, **kwargs)
        return process["child"]

    def ctrl_c():
        while not started.exists():
            time.sleep(0.05)
        process["child"].send_signal(signal.SIGINT)  # what the terminal sends to every process of the job
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    learning_study.subprocess.Popen = popen
    try:
        threading.Thread(target=ctrl_c, daemon=True).start()
        with pytest.raises(SystemExit, match="run the same command again to continue from 'train waltzrl seed 0'"):
            learning_study.run_command([sys.executable, "-c", child], "train waltzrl seed 0")
    finally:
        learning_study.subprocess.Popen = real_popen
        signal.signal(signal.SIGINT, previous)
    assert saved.read_text() == "checkpoint" and process["child"].returncode == 130
