"""bench/gpu_check.py in its --smoke mode (tiny shapes, the same code path, on the CPU): README's command in (b), the
dtype of (a)'s tests, the bf16 fallback without bitsandbytes, the time limit and the summary table; and
bench/memory.py's budget arithmetic."""
import json
import re
import time

import pytest
import torch

from bench import gpu_check, memory


def read_run(workdir):
    with open(workdir / "run" / "log.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    with open(workdir / "run" / "args.json") as f:
        return record, json.load(f)


@pytest.mark.slow  # a whole stage-2 iteration in a child process, and pytest --collect-only: ~30 s on 2 cores
def test_smoke_runs_the_whole_check_on_the_cpu(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "compute dtype 'auto' pinned to fp32" in out and "(a) passed" in out  # every GPU test still exists
    # EOS suppressed and every feedback read as "unsafe": all turns have the full length, every answer is revised
    assert "answers 4 x 8-8 tokens, feedback 4 x 8-8, revisions 4 x 8-8" in out
    for line in ("rollout", "judge", "update", "tokens/s", "sampling vs training log-probs, conversation",
                 "sampling vs training log-probs, feedback", "summary (time limit 480 s"):
        assert line in out, line
    assert re.search(r"\(b\) one iteration of README config +complete", out)
    record, args = read_run(tmp_path)
    assert record["stage"] == 2 and record["ftr"] == 1.0
    assert record["conversation/samples"] == record["feedback/samples"] == 4  # both agents were updated
    # 4-bit base: pi_old is recomputed by default, and on the CPU (fp32 compute) it matches the sampling log-probs
    assert record["feedback/sampling_logprob_mismatch"] < 1e-4
    # README's command: NF4 base and judge, gradient checkpointing, README's judge
    assert args["load_in_4bit"] == "yes" and args["gradient_checkpointing"] and args["recompute_old_logprobs"]
    assert args["judge_4bit"] and args["micro_batch_size"] == gpu_check.SMOKE_ARGS["micro_batch_size"]


def test_run_settings_are_readmes_command():
    flags = gpu_check.readme_train_flags()
    assert flags[flags.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    settings = gpu_check.run_settings(smoke=False, four_bit=True)
    assert (settings["load_in_4bit"], settings["gradient_checkpointing"], settings["judge_4bit"]) == ("yes", True, True)
    assert (settings["stage1_iterations"], settings["stage2_iterations"]) == (0, 1)
    assert settings["rollout_batch_size"] == int(flags[flags.index("--rollout-batch-size") + 1])
    fallback = gpu_check.run_settings(smoke=False, four_bit=False)
    assert (fallback["load_in_4bit"], fallback["judge_4bit"], fallback["dtype"]) == ("no", False, "bf16")


def test_tests_written_for_fp32_compute_in_fp32(monkeypatch):
    """The plugin of (a): 'auto' is fp32 even on a GPU; an explicit dtype is left alone."""
    from nanowaltz import base_model

    monkeypatch.setenv("NANOWALTZ_TEST_DTYPE", "fp32")
    monkeypatch.setattr(base_model, "compute_dtype", base_model.compute_dtype)  # restored after the test
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: True)
    assert base_model.compute_dtype("auto", "cuda") == torch.bfloat16  # what a GPU gets without the plugin
    gpu_check.pytest_configure(None)
    assert base_model.compute_dtype("auto", "cuda") == torch.float32
    assert base_model.compute_dtype(None, "cuda:0") == torch.float32
    assert base_model.compute_dtype("bf16", "cuda") == torch.bfloat16


@pytest.mark.slow  # the whole check again, in bf16: ~30 s on 2 cores
def test_without_bitsandbytes_it_runs_in_bf16_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "four_bit_unavailable", lambda smoke: "bitsandbytes is not installed")
    assert gpu_check.main(["--smoke", "--skip-tests", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes is not installed: NF4 4-bit is skipped" in out
    assert "in bf16 (no 4-bit: bitsandbytes is not installed)" in out and "(bf16, no 4-bit)" in out
    record, args = read_run(tmp_path)
    assert (args["load_in_4bit"], args["judge_4bit"], args["dtype"]) == ("no", False, "bf16")
    assert record["conversation/samples"] == 4


def test_a_part_past_its_share_is_stopped(tmp_path):
    began = time.perf_counter()
    output, stopped, _ = gpu_check.run_bounded(["bash", "-c", "echo measured so far; sleep 60"], {}, 1)
    assert stopped and "measured so far" in output and time.perf_counter() - began < 15


def test_time_limit_stops_part_b_and_the_summary_says_so(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--skip-tests", "--time-limit", "1", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "(b) STOPPED at its share of the time limit (1 s); measured before that: nothing" in out
    assert "summary (time limit 1 s" in out and "STOPPED" in out.split("summary")[-1]


def test_report_prints_what_a_stopped_part_measured(capsys):
    phases = {"model": {"seconds": 50.0}, "rollout": {"seconds": 80.0, "peak": 14.2, "reserved": 15.0, "longest": 1500,
                                                      "answers": [512] * 32, "feedback": [256] * 32,
                                                      "revisions": [512] * 32}}
    gpu_check.report({"status": "passed", "seconds": 100.0, "passed": 40, "failed": 0, "errors": 0},
                     {"status": "STOPPED", "seconds": 380.0, "phases": phases}, True, 480, 480)
    out = capsys.readouterr().out
    assert re.search(r"rollout +14.2 GB +15.0 GB", out) and "longest sequence 1500 tokens" in out
    assert re.search(r"\(b\) one iteration of README config +STOPPED", out)
    assert "peak allocated: rollout 14.2 GB" in out
    assert "40 passed, 0 failed, 0 errors" in out


def test_without_a_gpu_the_full_check_says_so(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "sees no CUDA device; on a CPU run --smoke" in capsys.readouterr().err


def test_missing_packages_are_named(monkeypatch, capsys):
    real_find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "accelerate") else real_find_spec(name, *a))
    assert gpu_check.main(["--smoke"]) == 2
    err = capsys.readouterr().err
    assert "missing Python packages: accelerate, peft" in err and "pip install --no-index" in err


def test_old_versions_are_reported(monkeypatch, capsys):
    real_version = gpu_check.importlib.metadata.version
    monkeypatch.setattr(gpu_check.importlib.metadata, "version",
                        lambda name: "5.10.1" if name == "transformers" else real_version(name))
    assert gpu_check.main(["--smoke"]) == 2
    assert "transformers 5.10.1 is older than 5.17" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- bench/memory.py
def synthetic_measurements(coefficients: dict) -> dict:
    """What bench/memory.py would measure if every phase cost exactly fixed + per layer + per token terms."""
    points = lambda c: {f"{L},{n}": memory.at(c, L, n) for L in (1, 2) for n in (512, 1024)}  # noqa: E731
    measured = {phase: points(coefficients[phase]) for phase in memory.PHASES}
    measured.update(weights={"1": 3.0e9, "2": 3.2e9}, adapter={"1": 5e6, "2": 10e6},
                    kv_cache={"2,1024": 2 * 1024 * 4096}, fused_kernel={"2048": 100e6, "4096": 150e6},
                    last_logits={"rollout_rows": 50e6, "judge_rows": 25e6}, machine="synthetic")
    return measured


def test_fit_recovers_the_coefficients():
    c = {"fixed": 120e6, "per_layer": 30e6, "per_token": 20e3, "per_layer_token": 9e3}
    points = {f"{L},{n}": memory.at(c, L, n) for L in (1, 2) for n in (512, 1024)}
    assert memory.fit(points) == pytest.approx(c)


def test_budget_adds_the_measured_rows_at_the_recipes_lengths():
    c = {"fixed": 100e6, "per_layer": 0.0, "per_token": 10e3, "per_layer_token": 8e3}
    measured = json.loads(json.dumps(synthetic_measurements({phase: c for phase in memory.PHASES})))
    lengths = memory.Lengths(revision_context=1000, revision_new=500, judge_input=700)
    result = memory.budget(measured, lengths, {"rollout_rows": 32, "micro_rows": 4, "judge_rows": 16})
    assert result["weights"] == pytest.approx((32 * 0.2e9 + 2.8e9) / 1e9)  # 32 layers + embeddings and lm_head
    assert result["adapters"] == pytest.approx(2 * 32 * 5e6 / 1e9)
    assert result["optimizer"] == pytest.approx(3 * result["adapters"])
    tokens = 4 * 1500  # the micro-batch padded to the longest sequence
    kernel = 50e6 + 50e6 / 2048 * 4 * 500  # the fused kernel: fixed + per action token
    assert result["update_activations"] == pytest.approx((100e6 + (10e3 + 32 * 8e3) * tokens + kernel) / 1e9)
    kv = 32 * 4096 * 32 * 1500  # 4 KB per token per layer, 32 rows at the longest
    logits = 50e6 / memory.LOGITS_ROWS["rollout_rows"] * 32  # measured at LOGITS_ROWS rows, scaled per row
    assert result["rollout_decode"] == pytest.approx((kv + 100e6 + (10e3 + 32 * 8e3) * 32 * 1500 + logits) / 1e9)
    resident = result["weights"] + result["adapters"] + result["optimizer"] + result["judge_weights"]
    assert result["peak"] == pytest.approx(resident + max(result["rollout_prefill"], result["rollout_decode"],
                                                          result["judge_prefill"], result["judge_decode"],
                                                          result["update_activations"]))


def test_docs_budget_is_the_measured_one_for_readmes_command_and_fits():
    """docs/gpu.md's budget table is bench/memory.py's, from the stored measurements, for README's current command,
    and that command fits a 24 GB card with 10% margin."""
    with open(memory.RESULTS) as f:
        measured = json.load(f)
    recipe = memory.readme_recipe()
    lengths = memory.Lengths(**measured["lengths"])
    result = memory.budget(measured, lengths, recipe)
    page = (gpu_check.REPO + "/docs/gpu.md")
    with open(page) as f:
        text = f.read()
    for line in memory.budget_lines(result, lengths, recipe, measured):
        assert line in text, line
    assert result["peak"] + memory.CUDA_CONTEXT_GB <= memory.CARD_GB * (1 - memory.MARGIN)
