"""GPU check: prove and measure train.py's GPU path on one CUDA GPU, offline, in a few minutes.

    python bench/gpu_check.py            # on a CUDA machine (no internet needed)
    python bench/gpu_check.py --smoke    # tiny shapes, the same code path, on a CPU (CI runs this)

(a) Tests. The test suite's device-aware tests run on the GPU (NANOWALTZ_TEST_DEVICE=cuda): the fused log-prob kernel
    against the naive one in fp32 and bf16, the sampler's recorded log-probs against a fresh forward, the device-checked
    training iterations (bf16, NF4 4-bit + LoRA, checkpoint, resume), and LoRA gradients through a 4-bit base after a
    no-grad generation. --smoke only checks that these tests still exist (pytest --collect-only).
(b) One real-size iteration. One stage-2 iteration of the real train.train (both agents: rollout, judge, scoring,
    update, checkpoint) at README's recommended 24 GB configuration ("On a GPU with a real model"), on a randomly
    initialised model with Llama-3.1-8B-Instruct's shapes, built from a LlamaConfig here and saved once, so that
    train.py loads and quantises it exactly as it would the real one. Nothing is downloaded.
    - Tokenizer: a byte-level BPE trained here on the project's own prompts and system prompts (~4 characters per
      token, like Llama's), padded with added tokens up to the config's 128256 ids, so that every id the model can
      sample decodes to text that encodes back to exactly one token (contexts keep their length).
    - Full-length answers: no end-of-turn token stops a sequence (sampler.stop_token_ids returns nothing), and every
      feedback is read as "unsafe", so every answer is revised: the longest contexts a stage-2 iteration can have.
    - Judge: the prompt's own label (harmful -> unsafe), so rewards and advantages are not all equal.
    Printed: peak GPU memory of the rollout and of the update (allocated and reserved, from torch.cuda) against the
    README's computed budget for this run's sequence lengths, rollout tokens/s, update seconds, and the mismatch
    between the log-probs recorded while sampling and the training forward (bf16, NF4). Random weights give
    near-uniform next-token distributions, so the mismatch of a trained model may differ; memory and time do not
    depend on the weights' values.

Needs: torch >= 2.11 with CUDA, transformers >= 5.17, peft, bitsandbytes (with its CUDA library), accelerate,
tokenizers, safetensors, numpy, tqdm, pytest; missing ones are named before anything runs. Writes ~16 GB (the bf16
random model) to --workdir (default: a temporary folder, removed at the end).
"""
import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# Run as `python bench/gpu_check.py`, sys.path[0] is bench/, where bench/rollout.py would shadow the project's.
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIME_LIMIT_S = 480  # the whole check, on one GPU
REQUIRED = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes", "numpy",
            "tqdm", "pytest")
OLDEST = {"torch": (2, 11), "transformers": (5, 17)}
GPU_TESTS = [
    "tests/test_logprobs.py::test_frozen_weight_matches_naive",
    "tests/test_logprobs.py::test_trainable_weight_matches_naive",
    "tests/test_logprobs.py::test_ignore_index_gives_zero_logprob_and_zero_grad",
    "tests/test_logprobs.py::test_bf16_close_to_fp32_reference",
    "tests/test_rollout.py::test_sampling_logprobs_match_a_fresh_forward",
    "tests/test_rollout.py::test_temperature_is_applied_to_the_recorded_logprobs",
    "tests/test_rollout.py::test_greedy_batched_equals_unbatched_and_generate",
    "tests/test_models.py::test_4bit_lora_gets_gradients_after_a_no_grad_generation",
    "tests/test_device_dtype.py",
]
# Llama-3.1-8B-Instruct's shapes (its config.json); --smoke keeps the structure at toy size.
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5)
# README "On a GPU with a real model": the recommended command for one 24 GB GPU, as train.Args fields (one stage-2
# iteration instead of the schedule; the judge is replaced, see above).
README_ARGS = dict(load_in_4bit="yes", gradient_checkpointing=True, prompts_per_iteration=32,
                   conversation_max_new_tokens=512, feedback_max_new_tokens=256, micro_batch_size=4, minibatch_size=32,
                   rollout_batch_size=32, stage1_iterations=0, stage2_iterations=1)
SMOKE_ARGS = {**README_ARGS, "prompts_per_iteration": 4, "conversation_max_new_tokens": 8, "feedback_max_new_tokens": 8,
              "micro_batch_size": 2, "minibatch_size": 4, "rollout_batch_size": 4}
GB = 1e9  # decimal, as in the README's table
CARD_24GB = 24 * 2 ** 30 / GB  # what a "24 GB" card (RTX 3090/4090) holds: 25.8 GB


# ---------------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------------
def missing_packages() -> list:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_environment(smoke: bool) -> list:
    """Clear one-line reasons why the check cannot run here (empty: it can); prints the versions it found."""
    missing = missing_packages()
    if missing:
        return [f"missing Python packages: {', '.join(missing)}. Install them offline from wheels, e.g. "
                f"pip install --no-index --find-links <folder of wheels> {' '.join(missing)}"]
    problems, found = [], []
    for name in REQUIRED:
        version = importlib.metadata.version(name)
        found.append(f"{name} {version}")
        if name in OLDEST and version_tuple(version) < OLDEST[name]:
            problems.append(f"{name} {version} is older than {'.'.join(map(str, OLDEST[name]))}, the oldest this "
                            f"check supports")
    print("packages: " + ", ".join(found))
    import torch

    if not smoke and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        problems.append(f"torch {torch.__version__} ({build}) sees no CUDA device; on a CPU run --smoke")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# A random model with the target shapes, and a tokenizer that covers its vocabulary
# ---------------------------------------------------------------------------------------------------------------------
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the project's prompts, refusals and system prompts, padded to vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import rollout

    texts = [rollout.CONVERSATION_SYSTEM_PROMPT, rollout.FEEDBACK_SYSTEM_PROMPT, rollout.REVISION_USER_TEMPLATE]
    for name, field in (("prompts.jsonl", "prompt"), ("refusal_responses.jsonl", "response")):
        with open(os.path.join(REPO, "data", name)) as f:
            texts += [json.loads(line).get(field, "") for line in f if line.strip()]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=min(8192, vocab_size // 2), special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Ids the BPE does not reach still need text: one added token each, which encodes back to that same id.
    bpe.add_tokens([f"<x{i}>" for i in range(bpe.get_vocab_size(), vocab_size)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def save_random_model(shapes: dict, folder: str, device: str) -> None:
    """A randomly initialised bf16 LlamaForCausalLM with these shapes plus the tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(shapes["vocab_size"])
    config = LlamaConfig(**shapes, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: 16 GB, never an fp32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# README's memory budget, recomputed for this run's shapes and sequence lengths
# ---------------------------------------------------------------------------------------------------------------------
def memory_budget(shapes: dict, lora_rank: int, rollout_rows: int, rollout_tokens: int, micro_rows: int,
                  micro_tokens: int, logprob_chunk: int = 1024) -> dict:
    """The README table's rows in GB (CUDA context and allocator slack excluded: torch.cuda does not count them)."""
    h, inter, layers, vocab = (shapes[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "vocab_size"))
    kv = shapes["num_key_value_heads"] * h // shapes["num_attention_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    lora = layers * lora_rank * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))  # r * (in + out) per linear
    weights = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * vocab * h * 2  # NF4 + double-quant scales; bf16 rest
    rows = {
        "weights": weights,
        "adapters": 2 * lora * 4,  # two agents, fp32
        "optimizer": 2 * lora * 4 * 3,  # gradients + two AdamW moments, both agents
        "kv_cache": layers * kv * 2 * 2 * rollout_rows * rollout_tokens,  # K and V, bf16
        # layer inputs kept by checkpointing + one layer recomputed (README: ~180 KB per token at hidden 4096) +
        # one fp32 logits chunk of the fused kernel
        "activations": micro_rows * micro_tokens * (layers * h * 2 + 180 * 1024 * h / 4096)
        + logprob_chunk * vocab * 4,
    }
    rows = {k: v / GB for k, v in rows.items()}
    rows["rollout"] = rows["weights"] + rows["adapters"] + rows["kv_cache"]  # + optimizer from the 2nd iteration on
    rows["update"] = rows["weights"] + rows["adapters"] + rows["optimizer"] + rows["activations"]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# (a) the device-aware tests, (b) one iteration of train.train
# ---------------------------------------------------------------------------------------------------------------------
def run_tests(smoke: bool, timeout: int = 300) -> bool:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + GPU_TESTS
    if smoke:
        command.append("--collect-only")
    env = {**os.environ, "NANOWALTZ_TEST_DEVICE": "cpu" if smoke else "cuda"}
    print(f"(a) {'collecting' if smoke else 'running'} the device-aware tests: NANOWALTZ_TEST_DEVICE="
          f"{env['NANOWALTZ_TEST_DEVICE']} {' '.join(command[1:])}", flush=True)
    began = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"(a) FAILED: the tests did not finish in {timeout} s")
        return False
    lines = (result.stdout + result.stderr).strip().splitlines()
    print("\n".join("    " + line for line in lines[-25:]))
    verdict = "passed" if result.returncode == 0 else f"FAILED (exit code {result.returncode})"
    print(f"(a) {verdict} in {time.perf_counter() - began:.0f} s", flush=True)
    return result.returncode == 0


def prompt_label_judge(prompts, responses, prompt_labels):
    from nanowaltz.judge import Labels

    return [Labels(unsafe=label == "harmful", overrefuse=False) for label in prompt_labels]


def run_iteration(shapes: dict, overrides: dict, workdir: str, device: str) -> dict:
    """Build and save the random model, run one stage-2 iteration of train.train on it; returns the measurements."""
    import torch

    import rollout
    from nanowaltz import sampler
    import train
    from nanowaltz.data import load_prompts

    cuda = device.startswith("cuda")
    began = time.perf_counter()
    model_dir = os.path.join(workdir, "random-model")
    save_random_model(shapes, model_dir, device)
    built = time.perf_counter()
    print(f"(b) random model with {shapes['num_hidden_layers']} layers, hidden {shapes['hidden_size']}, vocab "
          f"{shapes['vocab_size']} saved in {built - began:.0f} s", flush=True)

    flagged = rollout.parse_feedback('{"unsafe": true, "overrefuse": false, "reasoning": "", "feedback": "revise"}')
    measured = {"rollout_peak": float("nan"), "rollout_reserved": float("nan")}
    real_rollout = train.rollout

    def measured_rollout(model, tokenizer, prompts, config):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trajectories = real_rollout(model, tokenizer, prompts, config)
        if cuda:
            torch.cuda.synchronize()
            measured["rollout_peak"] = torch.cuda.max_memory_allocated() / GB
            measured["rollout_reserved"] = torch.cuda.max_memory_reserved() / GB
            torch.cuda.reset_peak_memory_stats()  # from here on the peak is the update's (the judge runs on the CPU)
        turns = [turn for t in trajectories for turn in t.answers + t.feedbacks]
        measured["rollout_tokens"] = max(len(turn.context_ids) + len(turn.action_ids) for turn in turns)
        measured["answers"] = [len(t.answers[0].action_ids) for t in trajectories]
        measured["feedback"] = [len(f.action_ids) for t in trajectories for f in t.feedbacks]
        measured["revisions"] = [len(r.action_ids) for t in trajectories for r in t.answers[1:]]
        return trajectories

    args = train.Args(model=model_dir, out=os.path.join(workdir, "run"), **overrides)
    prompts = load_prompts(os.path.join(REPO, "data", "prompts.jsonl"), split="train")
    with mock.patch.object(sampler, "stop_token_ids", lambda model, tokenizer: set()), \
            mock.patch.object(rollout, "parse_feedback", lambda text: dataclasses.replace(flagged, feedback=text)), \
            mock.patch.object(train, "rollout", measured_rollout):
        summary = train.train(args, judge=prompt_label_judge, prompts=prompts)
    record = summary["history"][-1]
    update_peak = torch.cuda.max_memory_allocated() / GB if cuda else float("nan")
    update_reserved = torch.cuda.max_memory_reserved() / GB if cuda else float("nan")
    context = float("nan")
    if cuda:  # what the device uses beyond torch's allocator: the CUDA context (and any other process)
        free, total = torch.cuda.mem_get_info()
        context = (total - free - torch.cuda.memory_reserved()) / GB
    longest = measured["rollout_tokens"]  # a micro-batch of the longest samples is the update's worst case
    budget = memory_budget(shapes, args.lora_rank, args.rollout_batch_size, longest, args.micro_batch_size, longest,
                           args.logprob_chunk_size)
    return {**measured, "record": record, "budget": budget, "update_peak": update_peak,
            "update_reserved": update_reserved, "context": context, "build_seconds": built - began,
            "train_seconds": time.perf_counter() - built, "recompute_old_logprobs": args.recompute_old_logprobs}


def report(result: dict) -> None:
    record, budget = result["record"], result["budget"]
    gb = lambda x: "n/a" if math.isnan(x) else f"{x:.1f} GB"  # noqa: E731
    span = lambda xs: f"{len(xs)} x {min(xs)}-{max(xs)}" if xs else "none"  # noqa: E731
    print(f"\n(b) one stage-2 iteration: answers {span(result['answers'])} tokens, feedback "
          f"{span(result['feedback'])}, revisions {span(result['revisions'])}; longest sequence "
          f"{result['rollout_tokens']} tokens")
    print(f"    {'phase':8s} {'peak allocated':>15s} {'peak reserved':>14s} {'README budget':>14s}")
    for phase in ("rollout", "update"):
        print(f"    {phase:8s} {gb(result[phase + '_peak']):>15s} {gb(result[phase + '_reserved']):>14s} "
              f"{gb(budget[phase]):>14s}")
    print("    budget rows: " + ", ".join(f"{k} {v:.2f}" for k, v in budget.items() if k not in ("rollout", "update"))
          + " GB (this first iteration's rollout holds no AdamW state yet: later ones add the optimizer row)")
    if not math.isnan(result["context"]):
        peak = max(result["rollout_reserved"] + budget["optimizer"], result["update_reserved"]) + result["context"]
        print(f"    device memory at the peak, with the CUDA context ({result['context']:.1f} GB) and the optimizer "
              f"state in later rollouts: {peak:.1f} GB; fits a 24 GB card ({CARD_24GB:.1f} GB): "
              f"{'yes' if peak <= CARD_24GB else 'NO'}")
    print(f"    rollout: {record['tokens_per_s']:.0f} tokens/s ({record['time_rollout']:.1f} s); "
          f"update: {record['time_update']:.1f} s; random model built and saved in {result['build_seconds']:.0f} s")
    for agent in ("conversation", "feedback"):
        key = f"{agent}/sampling_logprob_mismatch"
        if key in record:
            print(f"    sampling vs training log-probs, {agent}: max |diff| {record[key]:.4f}, mean "
                  f"{record[key + '_mean']:.5f} nats per token")
    if not result["recompute_old_logprobs"]:
        print("    (--recompute-old-logprobs was off, so the mismatch was not measured)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the same code path, in seconds")
    parser.add_argument("--skip-tests", action="store_true", help="skip (a), the device-aware tests")
    parser.add_argument("--workdir", default=None, help="where the random model (~16 GB in bf16) and the run go "
                                                        "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    problems = check_environment(args.smoke)
    if problems:
        for problem in problems:
            print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    import torch

    from bench.machine import machine_info

    print(machine_info())
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    tests_ok = True if args.skip_tests else run_tests(args.smoke)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nanowaltz-gpu-check-")
    try:
        result = run_iteration(TINY if args.smoke else LLAMA_31_8B, SMOKE_ARGS if args.smoke else README_ARGS,
                               workdir, device)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    seconds = time.perf_counter() - began
    print(f"\ntotal {seconds:.0f} s" + ("" if args.smoke else f" (limit {TIME_LIMIT_S} s)"))
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
