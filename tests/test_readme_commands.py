"""The README's GPU commands, run on the CPU: the one-GPU `train.py` command and the `torchrun` command of README "On a
GPU with a real model", read out of README.md, and the `TORCH_CUDA=1 bash setup.sh` line above them.

What differs from a GPU run, and nothing else:
- The hub ids resolve to tiny local models. A private hub cache (HF_HUB_CACHE, offline) holds a tiny random Llama as
  meta-llama/Llama-3.1-8B-Instruct and, as allenai/wildguard, a tiny judge whose answers are scripted in WildGuard's
  format (test_judge.build_scripted_judge_dir: an answer with "~" in it is a harmful response, others are not). So
  every flag stays as the README has it, the ids included: the base loads in NF4 4-bit through bitsandbytes' CPU path
  (--load-in-4bit yes), the judge too (--judge-4bit), and the judge's format is found from its id.
- Smaller counts, only by flags appended after the README's (argparse keeps the last value): one iteration per stage
  (--stage1-iterations 1 --stage2-iterations 1), 8 prompts per iteration in one minibatch (--prompts-per-iteration 8
  --minibatch-size 8), and --out in a temporary folder. The one-GPU command also gets a short warm-start
  (--warmstart-epochs 1 --warmstart-prompts 4), then a --resume that adds one stage-2 iteration. The lengths
  (512/256 new tokens), micro-batch, rollout batch, 4-bit, gradient checkpointing and the judge flags are the README's.
- torchrun: 2 ranks instead of the README's 4 (--nproc-per-node 2; gloo on a CPU).
"""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import train
from conftest import build_tiny_model_dir
from test_judge import build_scripted_judge_dir

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID, JUDGE_ID = "meta-llama/Llama-3.1-8B-Instruct", "allenai/wildguard"
SMALLER = ["--stage1-iterations", "1", "--stage2-iterations", "1", "--prompts-per-iteration", "8", "--minibatch-size",
           "8"]
WARM_START = ["--warmstart-epochs", "1", "--warmstart-prompts", "4"]
# Settings that the appended flags change, or that train.py resolves once the model is loaded.
NOT_FROM_README = {"out", "stage1_iterations", "stage2_iterations", "prompts_per_iteration", "minibatch_size",
                   "warmstart_epochs", "warmstart_prompts", "resume", "recompute_old_logprobs"}


def readme_gpu_commands() -> list:
    """The commands of the first bash block in README "On a GPU with a real model", continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## On a GPU with a real model"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def readme_command(first_word: str) -> list:
    (command,) = [c for c in readme_gpu_commands() if c[0] == first_word]
    return command


def cache_as(hub: Path, repo_id: str, build) -> None:
    """Put a model built by `build(folder)` into a hub cache as `repo_id` (its main revision)."""
    folder = hub / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    build(folder / "snapshots" / revision)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    cache_as(hub, MODEL_ID, build_tiny_model_dir)
    cache_as(hub, JUDGE_ID, build_scripted_judge_dir)
    return hub


def run(argv, hub, timeout=400):
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def log_rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def check_settings_are_the_readmes(out: Path, readme_flags: list) -> None:
    """Every setting the run saved is the README command's, except those the test appends."""
    saved = json.loads((out / "args.json").read_text())
    wanted = asdict(train.parse_args(readme_flags))
    differ = {k: (saved[k], v) for k, v in wanted.items() if k not in NOT_FROM_README and saved[k] != v}
    assert not differ, differ
    assert saved["recompute_old_logprobs"] is True  # resolved from the 4-bit base


def check_iterations(rows: list, prompts: int) -> None:
    for row in rows:
        # WildGuard's answers were all read (the scripted judge answers in its format), on the training device
        assert (row["judge_unparsed"], row["judge_items"], row["judge_device"]) == (0, prompts, "cpu")
        assert row["time_judge"] > 0


@pytest.mark.slow  # two launches of train.py at the README's lengths: about 40 s on 2 cores
def test_readme_one_gpu_command_with_warm_start_and_resume(hub, tmp_path):
    command = readme_command(".venv/bin/python")
    assert command[1] == "train.py" and command[command.index("--model") + 1] == MODEL_ID
    assert command[command.index("--judge") + 1] == f"hf:{JUDGE_ID}"
    out = tmp_path / "run"
    argv = [sys.executable] + command[1:] + SMALLER + WARM_START + ["--out", str(out)]
    done = run(argv, hub)
    assert f"judge: hf:{JUDGE_ID}, read as wildguard (by its hub id {JUDGE_ID})" in done.stderr
    rows = log_rows(out)
    assert [(r["iteration"], r["stage"]) for r in rows] == [(0, 0), (1, 1), (2, 2)]  # warm-start, stage 1, stage 2
    check_iterations(rows[1:], 8)
    check_settings_are_the_readmes(out, command[2:])
    # The scripted verdicts differ between answers, so the conversation agent got non-zero advantages and a gradient
    # (the random feedback agent writes no JSON: every feedback reward is 0, and so is its gradient).
    assert rows[2]["conversation/grad_norm"] > 0
    assert 0 < rows[2]["unsafe_rate_final"] < 1

    resumed = argv[:argv.index("--out")] + ["--stage2-iterations", "2", "--resume", "--out", str(out)]
    run(resumed, hub)
    rows = log_rows(out)
    assert [(r["iteration"], r["stage"]) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 2)]
    check_iterations(rows[3:], 8)
    assert (out / "adapters" / "conversation" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # two ranks of train.py at the README's lengths: about 40 s on 2 cores
def test_readme_torchrun_command_on_two_cpu_ranks(hub, tmp_path):
    command = readme_command("torchrun")
    assert command[command.index("--nproc-per-node") + 1] == "4"
    command[command.index("--nproc-per-node") + 1] = "2"
    script = command.index("train.py")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run"] + command[1:] + SMALLER + ["--out", str(out)]
    run(argv, hub, timeout=500)
    rows = log_rows(out)
    assert [(r["iteration"], r["stage"]) for r in rows] == [(1, 1), (2, 2)]  # one log, written by rank 0
    check_iterations(rows, 8)  # both ranks' judge counts, summed
    check_settings_are_the_readmes(out, command[script + 1:])


# ----------------------------------------------------------------------------------------------- TORCH_CUDA=1 setup.sh
STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for .venv/bin/python: logs each call; "-c" is setup.sh's CUDA check, which passes once a pip install of
# torch has run with $INDEX_GIVES_CUDA set.
echo "$*" >> "$STUB_LOG"
if [ "$1" = "-c" ]; then
    [ -f "$STUB_STATE" ] && { echo "setup.sh: torch 2.13.0, CUDA 12.8, GPU visible: True"; exit 0; }
    exit 1
fi
if [ "$1 $2 $3" = "-m pip install" ] && [[ "$*" == *"torch=="* ]] && [ -n "$INDEX_GIVES_CUDA" ]; then
    touch "$STUB_STATE"
fi
exit 0
"""


def run_setup(tmp_path, cuda_before=False, index_gives_cuda=True, **env):
    """setup.sh in a copy of the project whose .venv/bin/python is STUB_PYTHON; returns (result, pip calls)."""
    for name in ("setup.sh", "requirements.txt", "requirements-nodeps.txt"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    log, state = tmp_path / "calls.log", tmp_path / "has_cuda"
    if cuda_before:
        state.touch()
    environment = {**os.environ, "STUB_LOG": str(log), "STUB_STATE": str(state),
                   "INDEX_GIVES_CUDA": "1" if index_gives_cuda else "", **env}
    done = subprocess.run(["bash", str(tmp_path / "setup.sh")], env=environment, capture_output=True, text=True,
                          timeout=60)
    calls = [line for line in log.read_text().splitlines() if line.startswith("-m ")]  # the pip calls
    return done, calls


def test_readme_install_line_is_setup_with_torch_cuda():
    assert readme_gpu_commands()[0] == ["TORCH_CUDA=1", "bash", "setup.sh"]


def test_torch_cuda_puts_the_cuda_build_into_the_venv(tmp_path):
    torch_pin = re.search(r"^torch==\S+", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(0)
    done, calls = run_setup(tmp_path, TORCH_CUDA="1")
    assert done.returncode == 0, done.stderr
    assert calls == ["-m pip install -q --upgrade pip", "-m pip uninstall -q -y torch",
                     f"-m pip install -q {torch_pin} --index-url https://pypi.org/simple",
                     "-m pip install -q -r requirements.txt", "-m pip install -q --no-deps -r requirements-nodeps.txt"]
    assert "CUDA 12.8" in done.stdout


@pytest.mark.parametrize("case", ["cuda already there", "another index", "no TORCH_CUDA", "index without CUDA"])
def test_torch_cuda_cases(tmp_path, case):
    if case == "cuda already there":  # nothing to replace
        done, calls = run_setup(tmp_path, cuda_before=True, TORCH_CUDA="1")
        assert done.returncode == 0 and not [c for c in calls if "torch" in c]
    elif case == "another index":
        done, calls = run_setup(tmp_path, TORCH_CUDA="1", TORCH_INDEX_URL="https://example.org/cu128")
        assert done.returncode == 0 and any(c.endswith("--index-url https://example.org/cu128") for c in calls)
    elif case == "no TORCH_CUDA":  # CI and CPU machines: requirements.txt alone, as before
        done, calls = run_setup(tmp_path, index_gives_cuda=False)
        assert done.returncode == 0 and not [c for c in calls if "torch" in c]
    else:  # a pip configuration that still serves a CPU build: a clear stop, not a CPU .venv that looks fine
        done, calls = run_setup(tmp_path, index_gives_cuda=False, TORCH_CUDA="1")
        assert done.returncode == 1 and "-m pip install -q -r requirements.txt" not in calls
        assert "TORCH_CUDA=1, but the torch in .venv is not a CUDA build" in done.stderr
