"""Data-parallel training (distributed.py) on 2 CPU processes with gloo, launched by torchrun as a user would:
2 ranks x B/2 samples take the same optimizer step as 1 process x B samples; a short run writes one log and one
checkpoint and resumes; a failing or hanging rank stops the job with a clear message. The spawned ranks run
tests/distributed_worker.py; starting ranks costs many seconds of imports, so one launch runs all scenarios."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed_worker
from nanowaltz.base_model import load_base
from nanowaltz.models import attach_agents, load_agents, save_agents

ROOT = Path(__file__).resolve().parents[1]


def torchrun(model_dir, out, timeout=400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "distributed_worker.py"), model_dir, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - began


@pytest.fixture(scope="module")
def launch(tiny_model_dir, tmp_path_factory):
    """Adapters with non-zero B (so every LoRA matrix has a gradient), then the one 2-rank launch of all scenarios."""
    out = tmp_path_factory.mktemp("distributed")
    base, _ = load_base(tiny_model_dir, load_in_4bit=False, device="cpu")
    model = attach_agents(base, rank=4, alpha=8)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.05)
    save_agents(model, out / "adapters_before")
    done, seconds = torchrun(tiny_model_dir, out)
    if not (out / "fail_rank0.txt").exists():  # the launch ends with the hanging-rank error; it must get that far
        pytest.fail(f"the 2-rank launch stopped early:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return out, done, seconds


@pytest.mark.parametrize("update", list(distributed_worker.UPDATES))
def test_two_ranks_take_the_one_process_optimizer_step(launch, tiny_model_dir, update):
    out = launch[0]
    untrained = load_agents(load_base(tiny_model_dir, load_in_4bit=False, device="cpu")[0],
                            out / "adapters_before")
    before = {n: p for n, p in untrained.named_parameters() if ".feedback." in n and "lora_" in n}
    reference, reference_stats = distributed_worker.run_update(tiny_model_dir, out / "adapters_before", update)
    ranks = [torch.load(out / f"{update}_rank{r}.pt") for r in range(2)]
    for name, expected in reference.items():
        moved = (expected - before[name]).abs().max().item()
        assert moved > 1e-3, f"{name} did not move: the comparison below would prove nothing"
        torch.testing.assert_close(ranks[0]["weights"][name], expected, rtol=0, atol=1e-5)
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])  # the same step on every rank
    for key in ("loss", "kl", "policy_loss", "entropy", "grad_norm", "clip_frac"):  # statistics over the global batch
        assert ranks[0]["stats"][key] == pytest.approx(reference_stats[key], rel=1e-4, abs=1e-6), key
    assert ranks[0]["stats"]["samples"] == reference_stats["samples"] == 8


def test_two_rank_run_writes_one_log_and_checkpoint_and_resumes(launch):
    out = launch[0]
    run = out / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # one line per iteration (rank 0 alone writes): 2 iterations, then 1 more after --resume
    assert [r["iteration"] for r in records] == [1, 2, 3]
    # rewards, samples and advantages are over the global batch: 4 prompts -> 4 conversation samples, though each
    # rank rolled out 2
    assert records[1]["conversation/samples"] == records[2]["conversation/samples"] == 4
    assert sorted(p.name for p in run.iterdir()) == ["adapters", "args.json", "checkpoint", "log.jsonl"]
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["iteration"] == 3
    ranks = [json.loads((out / f"train_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == [3]  # the resumed run did the one missing iteration
    assert ranks[0]["fingerprint_first_run"] == ranks[1]["fingerprint_first_run"]  # identical adapters on both ranks
    assert ranks[0]["fingerprint_resumed"] == ranks[1]["fingerprint_resumed"]
    assert ranks[0]["fingerprint_resumed"] != ranks[0]["fingerprint_first_run"]
    # resuming continues exactly: the same adapters and log as the run that was never stopped
    assert ranks[0]["fingerprint_resumed"] == ranks[0]["fingerprint_straight"]
    straight = [json.loads(line) for line in (out / "run_straight" / "log.jsonl").read_text().splitlines()]
    for record, expected in zip(records, straight):
        assert {k: v for k, v in record.items() if not k.startswith(("time_", "tokens_per_s"))} == \
            {k: v for k, v in expected.items() if not k.startswith(("time_", "tokens_per_s"))}


def test_a_failing_rank_stops_every_rank_and_a_hanging_rank_times_out(launch):
    out, done, seconds = launch
    # bad input on rank 1 only: rank 1 raises the judge's own error, rank 0 stops naming rank 1 and the error
    assert "harmfull" in (out / "fail_rank1.txt").read_text()
    rank0 = (out / "fail_rank0.txt").read_text()
    assert rank0.startswith("SystemExit: rank 0: stopping, rank 1 failed during judging: ValueError: judge:"), rank0
    assert "harmfull" in rank0
    # then rank 1 hangs (a 600 s judge): rank 0 gives up after --dist-timeout 8 s, and torchrun stops rank 1
    assert done.returncode != 0
    assert "rank 0: lost the other ranks at the check after judging (no answer within --dist-timeout 8 s" in done.stderr
    assert seconds < 300, "the job waited for the hanging rank instead of stopping"
