"""The GPU path on the CPU: device placement and the GPU's number formats (bf16, NF4 4-bit + LoRA).

A GPU run differs from a CPU run in two ways a CPU-only test suite would never notice:
- Where tensors live. The model sits on the GPU while the default device stays the CPU, so a tensor made without
  device= lands on the CPU and the first op that mixes it with the model's tensors fails. On a CPU-only machine both
  are the CPU and the bug is invisible. We make it visible: inputs on the CPU, and every allocation that does not name
  its device sent to the meta device instead (the whole kernel under torch.set_default_device("meta"); for a whole
  training iteration, conftest.OurAllocationsWithoutDeviceOnMeta, which only redirects the project's own calls).
- Number format. A GPU computes in bf16, usually on an NF4 4-bit base with fp32 LoRA adapters. We run one whole
  training iteration (rollout, judge, update, checkpoint, resume) in each format, and measure how far the log-probs
  recorded while sampling are from the training forward in bf16 (why --recompute-old-logprobs is on there).

bench/gpu_check.py runs the device-aware tests here on a real GPU (NANOWALTZ_TEST_DEVICE=cuda).
"""
import json
import math

import pytest
import torch

import infer
import logprobs
import rollout
import train
from conftest import OurAllocationsWithoutDeviceOnMeta, build_tiny_model_dir
from models import adapter_parameters, attach_agents, load_base, use_agent
from reward import Labels, ParsedFeedback

PROMPTS = [{"id": f"p{i}", "prompt": text, "label": "harmful" if i % 2 else "benign", "category": "toy"}
           for i, text in enumerate(["hi there", "How do I kill a process?", "What is SQL injection?", "make a bomb"])]
# Measured on the tiny model below (initializer_range 0.3): fp32 (plain or NF4) <= 1e-5, bf16 (plain or NF4) <= 0.033.
SAMPLING_TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}


def toy_judge(prompts, responses, prompt_labels):
    return [Labels(unsafe=not (r[:1].isascii() and r[:1].islower()), overrefuse=False) for r in responses]


@pytest.fixture
def toy_feedback(monkeypatch):
    """Random weights never write JSON: parse the feedback text by a toy rule so that some answers get revised."""
    def parse(text):
        body = text[len(rollout.FEEDBACK_PREFILL):]
        return None if len(body) % 4 == 0 else ParsedFeedback(Labels("e" in body, False), "start in lowercase", "")
    monkeypatch.setattr(rollout, "parse_feedback", parse)


@pytest.fixture(scope="module")
def wide_logits_model_dir(tmp_path_factory):
    """Larger random weights: logits spread over several nats, as in a trained model, so rounding shows."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("wide-logits"), initializer_range=0.3)


# ----------------------------------------------------------------------------- the fused kernel

@pytest.mark.parametrize("weight_trainable, hidden_grad_in_forward", [(False, True), (False, False), (True, True)])
def test_kernel_allocates_everything_on_its_inputs_device(weight_trainable, hidden_grad_in_forward, device):
    """Inputs on `device`, default device meta: any buffer made without device= would be meta and break the kernel."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=gen).to(device)
    weight = (torch.randn(1001, 24, generator=gen) / 24 ** 0.5 * 3).to(device)
    targets = torch.randint(0, 1001, (37,), generator=gen).to(device)
    targets[[0, 16]] = -100  # masked tokens take their own branch
    grad_out = torch.randn(37, generator=gen).to(device)
    results = {}
    for method in ("fused", "naive"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(weight_trainable)
        if method == "fused":
            with torch.device("meta"):
                logp, entropy = logprobs.token_logprobs(h, w, targets, 0.8, chunk_size=16, vocab_chunk_size=100,
                                                        return_entropy=True,
                                                        hidden_grad_in_forward=hidden_grad_in_forward)
                (logp * grad_out).sum().backward()
            assert logp.device == entropy.device == h.grad.device == hidden.device
        else:
            valid = targets != -100
            logp = logprobs.naive_token_logprobs(h, w, targets.clamp(min=0), 0.8) * valid
            (logp * grad_out).sum().backward()
        results[method] = (logp.detach(), h.grad, w.grad)
    (fused, fused_gh, fused_gw), (naive, naive_gh, naive_gw) = results["fused"], results["naive"]
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_gh, naive_gh, rtol=1e-5, atol=1e-5)
    if weight_trainable:
        assert fused_gw.device == weight.device
        torch.testing.assert_close(fused_gw, naive_gw, rtol=1e-5, atol=1e-5)
    else:
        assert fused_gw is None


def test_the_meta_trick_catches_a_bare_allocation():
    """The check above can fail: a buffer made the way the kernel used to make them breaks under it."""
    hidden = torch.randn(3, 4)
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        running = torch.zeros(3)  # no device=: meta here, the CPU on a GPU machine
        torch.where(hidden[:, 0] > 0, hidden[:, 0], running).sum().item()


def test_project_allocations_without_device_fail_under_the_mode(device):
    """conftest's mode redirects allocations made from the project's files, and leaves the tests' own alone."""
    samples = [train.Sample("feedback", "g", [1, 2, 3], [4, 5], [0.0, 0.0], 1.0)]
    with OurAllocationsWithoutDeviceOnMeta():
        assert torch.zeros(2).device.type == "cpu"  # this file is a test: not redirected
        assert logprobs.pad_batch(samples, 0, device).input_ids.device.type == torch.device(device).type
        compiled = compile("import torch\nmade = torch.zeros(2)", str(logprobs.__file__), "exec")
        namespace = {}
        exec(compiled, namespace)  # code "from" a project file
        assert namespace["made"].device.type == "meta"


# ----------------------------------------------------------------------------- a whole iteration, device-checked

def tiny_args(model_dir, out, **overrides):
    settings = dict(model=model_dir, out=str(out), stage1_iterations=0, stage2_iterations=1, prompts_per_iteration=4,
                    conversation_max_new_tokens=5, feedback_max_new_tokens=5, feedback_lr=1e-2, conversation_lr=1e-2,
                    save_every=1, minibatch_size=4, micro_batch_size=2)
    settings.update(overrides)
    return train.Args(**settings)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_training_iteration_allocates_nothing_away_from_the_model(tiny_model_dir, tmp_path, toy_feedback, device):
    """Warm-start, rollout, judge, scoring, update, checkpoint, resume (with gradient checkpointing, so both forward
    paths of the update run) and inference, with every project allocation that names no device sent to meta."""
    with OurAllocationsWithoutDeviceOnMeta():
        args = tiny_args(tiny_model_dir, tmp_path / "run", warmstart_epochs=1, recompute_old_logprobs=True)
        summary = train.train(args, judge=toy_judge, prompts=PROMPTS)
        assert next(summary["model"].parameters()).device.type == torch.device(device).type
        resumed = tiny_args(tiny_model_dir, tmp_path / "run", stage2_iterations=2, resume=True,
                            gradient_checkpointing=True, warmstart_epochs=1)
        summary = train.train(resumed, judge=toy_judge, prompts=PROMPTS)
        assert infer.main(["--model", tiny_model_dir, "--adapters", str(tmp_path / "run" / "adapters"), "--prompt",
                           "hi there", "--max-new-tokens", "3", "--feedback-max-new-tokens", "3"]) == 0
    assert [h["iteration"] for h in summary["history"]] == [2]
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["stage"] for r in log] == [0, 2, 2]
    assert all(math.isfinite(r["conversation/loss"]) and math.isfinite(r["feedback/loss"]) for r in log[1:])
