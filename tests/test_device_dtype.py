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
from nanowaltz import logprobs
import rollout
import train
from conftest import OurAllocationsWithoutDeviceOnMeta, build_tiny_model_dir
from nanowaltz.base_model import load_base
from nanowaltz.models import adapter_parameters, attach_agents, use_agent
from nanowaltz.judge import Labels
from test_train import PROMPTS, toy_feedback, toy_judge  # noqa: F401 (toy_feedback is a fixture)

# Measured on the tiny model below (initializer_range 0.3): fp32 (plain or NF4) <= 1e-5, bf16 (plain or NF4) <= 0.033.
SAMPLING_TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}


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


# ----------------------------------------------------------------------------- the GPU's number formats

@pytest.mark.parametrize("four_bit", ["no", "yes"], ids=["bf16", "nf4-bf16"])
def test_training_iteration_in_bf16_and_nf4(wide_logits_model_dir, tmp_path, toy_feedback, four_bit, device):
    """One stage-1 and one stage-2 iteration in bf16 compute (on a plain or an NF4 4-bit base), checkpointed after
    each, then a resumed third: what a GPU run does, in its number formats, device-checked as above."""
    import bitsandbytes as bnb

    args = tiny_args(wide_logits_model_dir, tmp_path / "run", stage1_iterations=1, dtype="bf16",
                     load_in_4bit=four_bit)
    # Rewards that differ by prompt whatever is sampled, so both agents get non-zero advantages in stage 2 (with
    # toy_judge, all four sampled answers can earn the same reward, and then the conversation adapter rightly stays 0).
    def judge_by_prompt_label(prompts, responses, prompt_labels):
        return [Labels(unsafe=label == "harmful", overrefuse=False) for label in prompt_labels]

    with OurAllocationsWithoutDeviceOnMeta():
        summary = train.train(args, judge=judge_by_prompt_label, prompts=PROMPTS)
    model = summary["model"]
    base = model.get_base_model()
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == (four_bit == "yes")
    for agent in ("conversation", "feedback"):  # fp32 adapters on the bf16 base, and both trained
        params = adapter_parameters(model, agent)
        assert all(p.dtype == torch.float32 for p in params)
        assert any(torch.count_nonzero(p) > 0 for n, p in model.named_parameters()
                   if "lora_B" in n and f".{agent}." in n)
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert saved["recompute_old_logprobs"] is True  # auto: bf16 sampling log-probs are not pi_old exactly
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [(r["iteration"], r["stage"]) for r in log] == [(1, 1), (2, 2)]
    for key in ("feedback/loss", "feedback/kl", "feedback/grad_norm", "conversation/loss", "conversation/grad_norm"):
        assert math.isfinite(log[-1][key]), key
    for record in log:
        for agent in ("feedback", "conversation"):
            if f"{agent}/sampling_logprob_mismatch" in record:
                assert record[f"{agent}/sampling_logprob_mismatch"] < SAMPLING_TOLERANCE["bf16"]

    resumed = tiny_args(wide_logits_model_dir, tmp_path / "run", stage1_iterations=1, stage2_iterations=2,
                        dtype="bf16", load_in_4bit=four_bit, resume=True)
    with OurAllocationsWithoutDeviceOnMeta():
        summary = train.train(resumed, judge=judge_by_prompt_label, prompts=PROMPTS)
    assert [h["iteration"] for h in summary["history"]] == [3]
    assert [r["iteration"] for r in read_log(tmp_path / "run" / "log.jsonl")] == [1, 2, 3]
    assert math.isfinite(summary["history"][0]["conversation/loss"])


@pytest.mark.parametrize("dtype, four_bit", [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)])
def test_sampling_logprobs_against_the_training_forward(wide_logits_model_dir, dtype, four_bit, device):
    """What sample() records (KV cache, left padding, one token at a time) against action_logprobs (the whole
    sequence at once, fused kernel), in the compute format of a CPU run and of a GPU run."""
    base, tokenizer = load_base(wide_logits_model_dir, load_in_4bit=four_bit, device=device, dtype=dtype)
    model = attach_agents(base)
    with torch.no_grad():  # a trained-looking adapter, so that its bf16 rounding counts too
        gen = torch.Generator().manual_seed(0)
        for p in adapter_parameters(model, "conversation"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    use_agent(model, "conversation")
    model.eval()
    contexts = [rollout.chat_ids(tokenizer, [{"role": "user", "content": text}])
                for text in ("hi", "How do I kill a Python process on Linux?", "What is SQL injection? " * 4)]
    torch.manual_seed(0)
    actions, recorded, _ = rollout.sample(model, tokenizer, contexts, max_new_tokens=16)
    samples = [train.Sample("conversation", "g", c, a, r, 0.0) for c, a, r in zip(contexts, actions, recorded)]
    with torch.no_grad():
        trained = logprobs.action_logprobs(model, logprobs.pad_batch(samples, tokenizer.pad_token_id, device), 1.0, 64)
    gap = (trained.cpu() - torch.tensor([lp for r in recorded for lp in r])).abs().max().item()
    assert gap <= SAMPLING_TOLERANCE[dtype], gap


def test_dtype_and_recompute_flags(capsys):
    from nanowaltz.base_model import compute_dtype

    assert train.parse_args([]).dtype == "auto" and train.parse_args(["--dtype", "bf16"]).dtype == "bf16"
    assert compute_dtype("auto", "cpu") == torch.float32 and compute_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(SystemExit, match="--dtype: unknown compute dtype 'fp16'"):
        compute_dtype("fp16", "cpu")
    assert train.parse_args([]).recompute_old_logprobs is None  # auto, resolved once the model is loaded
    assert train.parse_args(["--recompute-old-logprobs"]).recompute_old_logprobs is True
    assert train.parse_args(["--no-recompute-old-logprobs"]).recompute_old_logprobs is False
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--dtype DTYPE" in help_text and "--no-recompute-old-logprobs" in help_text
    assert "~30% slower" in help_text and "option_strings" not in help_text  # a bare % used to garble the help


# ----------------------------------------------------------------------------- gradient checkpointing in the update

class LayerForwardCounter:
    """Counts, during train.update_agent only, the decoder's forward passes and the calls of its first layer's MLP.
    transformers checkpoints a layer's `forward`, so a hook on a module inside the layer also fires when backward
    recomputes it: with checkpointing the MLP runs twice per decoder pass. A pre-hook, because the recompute stops as
    soon as it has rebuilt the last tensor backward needs (inside the MLP), so a hook after the MLP would miss it."""

    def __init__(self, monkeypatch):
        self.decoder_passes = self.mlp_calls = self.in_backward = 0
        real_update = train.update_agent

        def update_agent(model, *args, **kwargs):
            decoder = model.get_base_model().get_decoder()
            hooks = [decoder.register_forward_pre_hook(self._count_pass),
                     decoder.layers[0].mlp.register_forward_pre_hook(self._count_mlp)]
            try:
                return real_update(model, *args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()

        monkeypatch.setattr(train, "update_agent", update_agent)

    def counts(self) -> tuple:
        return self.decoder_passes, self.mlp_calls, self.in_backward

    def _count_pass(self, module, inputs):
        self.decoder_passes += 1

    def _count_mlp(self, module, inputs):
        self.mlp_calls += 1
        self.in_backward += torch._C._current_autograd_node() is not None  # a recompute runs inside backward


@pytest.mark.parametrize("checkpointing", [True, False], ids=["on", "off"])
def test_update_recomputes_layers_after_warm_start_iff_checkpointing(tiny_model_dir, tmp_path, toy_feedback,
                                                                     monkeypatch, checkpointing):
    """After a warm-start, the periodic eval and a rollout (each leaves the model in eval mode, as does the resume's
    load_adapter), every RL update still recomputes each checkpointed layer in backward with --gradient-checkpointing,
    and never without it."""
    counter = LayerForwardCounter(monkeypatch)
    args = tiny_args(tiny_model_dir, tmp_path / "run", warmstart_epochs=1, eval_every=1,
                     gradient_checkpointing=checkpointing)
    train.train(args, judge=toy_judge, prompts=PROMPTS, eval_prompts=PROMPTS[:2])
    first = counter.counts()
    resumed = tiny_args(tiny_model_dir, tmp_path / "run", stage2_iterations=2, resume=True, warmstart_epochs=1,
                        eval_every=1, gradient_checkpointing=checkpointing)
    train.train(resumed, judge=toy_judge, prompts=PROMPTS, eval_prompts=PROMPTS[:2])
    second = tuple(after - before for after, before in zip(counter.counts(), first))
    for passes, mlp_calls, in_backward in (first, second):  # the first run, then the resumed one
        assert passes >= 2  # both agents were updated
        if checkpointing:  # every layer run again in backward
            assert (mlp_calls, in_backward) == (2 * passes, passes)
        else:
            assert (mlp_calls, in_backward) == (passes, 0)
