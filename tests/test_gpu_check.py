"""bench/gpu_check.py in its --smoke mode (tiny shapes, the same code path, on the CPU), its memory budget against the
README's numbers, and its clear refusals when a package or the GPU is missing."""
import json

import pytest

from bench import gpu_check


def test_smoke_runs_the_whole_check_on_the_cpu(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(a) passed" in out  # every test the GPU run selects still exists
    # EOS suppressed and every feedback read as "unsafe": all turns have the full length, every answer is revised
    assert "answers 4 x 8-8 tokens, feedback 4 x 8-8, revisions 4 x 8-8" in out
    for line in ("rollout", "update", "tokens/s", "sampling vs training log-probs, conversation",
                 "sampling vs training log-probs, feedback"):
        assert line in out, line
    with open(tmp_path / "run" / "log.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["stage"] == 2 and record["ftr"] == 1.0
    assert record["conversation/samples"] == record["feedback/samples"] == 4  # both agents were updated
    # 4-bit base: pi_old is recomputed by default, and on the CPU (fp32 compute) it matches the sampling log-probs
    assert record["feedback/sampling_logprob_mismatch"] < 1e-4
    with open(tmp_path / "run" / "args.json") as f:
        args = json.load(f)
    assert args["load_in_4bit"] == "yes" and args["gradient_checkpointing"] and args["recompute_old_logprobs"]


def test_budget_reproduces_the_readme_table():
    """README "On a GPU with a real model": 5.7 GB weights, 0.34 GB adapters, 1.0 GB optimizer, ~4.4 GB KV cache at
    32 x ~1100 tokens, ~2.5 GB update activations at micro-batch 4 x 1100 tokens."""
    budget = gpu_check.memory_budget(gpu_check.LLAMA_31_8B, 16, 32, 1100, 4, 1100)
    assert budget["weights"] == pytest.approx(5.7, abs=0.05)
    assert budget["adapters"] == pytest.approx(0.34, abs=0.01)
    assert budget["optimizer"] == pytest.approx(1.0, abs=0.02)
    assert budget["kv_cache"] == pytest.approx(32 * 1100 * 128 * 1024 / 1e9)  # 128 KB per token
    assert budget["activations"] == pytest.approx(2.5, abs=0.05)


def test_missing_packages_are_named(monkeypatch, capsys):
    real_find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "bitsandbytes") else real_find_spec(name, *a))
    assert gpu_check.main(["--smoke"]) == 2
    err = capsys.readouterr().err
    assert "missing Python packages: peft, bitsandbytes" in err and "pip install --no-index" in err


def test_without_a_gpu_the_full_check_says_so(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "sees no CUDA device; on a CPU run --smoke" in capsys.readouterr().err


def test_old_versions_are_reported(monkeypatch, capsys):
    real_version = gpu_check.importlib.metadata.version
    monkeypatch.setattr(gpu_check.importlib.metadata, "version",
                        lambda name: "5.10.1" if name == "transformers" else real_version(name))
    assert gpu_check.main(["--smoke"]) == 2
    assert "transformers 5.10.1 is older than 5.17" in capsys.readouterr().err
