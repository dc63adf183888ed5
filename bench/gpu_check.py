"""GPU check: prove and measure train.py's GPU path on one CUDA GPU, offline, within a time limit.

    python bench/gpu_check.py            # on a CUDA machine (no internet needed); --time-limit 480 by default
    python bench/gpu_check.py --smoke    # tiny shapes, the same code path, on a CPU (CI runs this)

(a) Tests. The test suite's device-aware tests run on the GPU (NANOWALTZ_TEST_DEVICE=cuda): the fused log-prob kernel
    against the naive one, the sampler's recorded log-probs against a fresh forward, the device-checked training
    iterations (bf16, NF4 4-bit + LoRA, checkpoint, resume, gradient checkpointing), and LoRA gradients through a 4-bit
    base after a no-grad generation. Each test runs at the dtype its tolerances were written for: the compute dtype
    'auto' (bf16 on a GPU) is pinned to fp32, and TF32 is off, so a test written with fp32 tolerances computes in fp32;
    the tests of bf16 set bf16 themselves and have bf16 tolerances (tests/test_device_dtype.py). --smoke only checks
    that these tests still exist (pytest --collect-only).
(b) One real-size iteration. One stage-2 iteration of the real train.train (both agents: rollout, judge, scoring,
    update, checkpoint) with README's recommended one-GPU command ("On a GPU with a real model", read from README.md),
    on a randomly initialised model with Llama-3.1-8B-Instruct's shapes, built from a LlamaConfig here and saved once,
    so that train.py loads and quantises it exactly as it would the real one. Nothing is downloaded.
    - Tokenizer: a byte-level BPE trained here on the project's own prompts and system prompts (~4 characters per
      token, like Llama's), padded with added tokens up to the config's 128256 ids, so that every id the model can
      sample decodes to text that encodes back to exactly one token (contexts keep their length).
    - Full-length answers: no end-of-turn token stops a sequence (sampler.stop_token_ids returns nothing), and every
      feedback is read as "unsafe", so every answer is revised: the longest contexts a stage-2 iteration can have.
    - Judge: the same random model loaded a second time as README's judge is (an hf: judge in WildGuard's format, on
      the GPU, NF4 with --judge-4bit): a stand-in for WildGuard's memory and time (the same decoder layers, a larger
      vocabulary). Its random output never parses, so its labels come from the prompt's own label (harmful ->
      unsafe), which also keeps rewards and advantages from being all equal.
    Printed: peak GPU memory of the rollout, the judge and the update (allocated and reserved, from torch.cuda) next
    to the budget README quotes (bench/memory.py: measured per layer on a CPU, extrapolated) at this run's sequence
    lengths, rollout tokens/s, judge and update seconds, and the mismatch between the log-probs recorded while
    sampling and the training forward (bf16, NF4). Random weights give near-uniform next-token distributions, so the
    mismatch of a trained model may differ; memory and time do not depend on the weights' values.
Without bitsandbytes (or without its CUDA library) the check says so, skips the tests of 4-bit loading and runs (b)
in plain bf16 (--load-in-4bit no, no --judge-4bit): 16 GB per copy of the model, which needs a GPU larger than 24 GB.

The time limit is enforced: (a) may take 40% of it, (b) the rest. A part that runs past its share is stopped, and what
it measured until then is printed. The last lines are one summary table of both parts.

Needs: torch >= 2.11 with CUDA, transformers >= 5.17, peft, accelerate, tokenizers, safetensors, numpy, tqdm, pytest;
bitsandbytes (with its CUDA library) for NF4. Missing ones are named before anything runs. Writes ~16 GB (the bf16
random model) to --workdir (default: a temporary folder, removed at the end).
"""
import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
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
TESTS_SHARE = 0.4  # of the time limit, for (a); (b) gets what is left
REQUIRED = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "numpy", "tqdm", "pytest")
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
# The tests above that load a model in 4-bit (deselected when bitsandbytes cannot run): by name and by parameter id.
FOUR_BIT_TESTS = "not 4bit and not nf4 and not True"
# Llama-3.1-8B-Instruct's shapes (its config.json); --smoke keeps the structure at toy size.
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5)
# (b) runs README's command with one stage-2 iteration instead of its schedule; --smoke also at toy lengths.
ONE_ITERATION = dict(stage1_iterations=0, stage2_iterations=1)
SMOKE_ARGS = dict(prompts_per_iteration=4, conversation_max_new_tokens=8, feedback_max_new_tokens=8,
                  micro_batch_size=2, minibatch_size=4, rollout_batch_size=4, judge_batch_size=4)
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


def four_bit_unavailable(smoke: bool) -> str:
    """Why NF4 cannot run here ('' when it can): bitsandbytes missing, or without its library for this device."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb
        import torch

        if not smoke:  # a 4-bit round trip on the GPU: the CUDA library is there and loads
            weight = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
            packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
            bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:  # ImportError, a missing CUDA library, an unsupported GPU
        return f"bitsandbytes cannot run here ({type(err).__name__}: {str(err).strip().splitlines()[0][:160]})"
    return ""


def check_environment(smoke: bool) -> list:
    """Clear one-line reasons why the check cannot run here (empty: it can); prints the versions it found."""
    missing = missing_packages()
    if missing:
        return [f"missing Python packages: {', '.join(missing)}. Install them offline from wheels, e.g. "
                f"pip install --no-index --find-links <folder of wheels> {' '.join(missing)}"]
    problems, found = [], []
    for name in REQUIRED + (("bitsandbytes",) if importlib.util.find_spec("bitsandbytes") else ()):
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
# README's command
# ---------------------------------------------------------------------------------------------------------------------
def readme_train_flags() -> list:
    """The flags of README's one-GPU `train.py` command ("On a GPU with a real model")."""
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## On a GPU with a real model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    for line in block.splitlines():
        words = shlex.split(line.split("  #", 1)[0])
        if words[:2] == [".venv/bin/python", "train.py"]:
            return words[2:]
    raise SystemExit("gpu_check: README.md has no `.venv/bin/python train.py` command under \"On a GPU with a real "
                     "model\"")


def run_settings(smoke: bool, four_bit: bool) -> dict:
    """train.Args fields of (b): README's command, one stage-2 iteration (--smoke: toy lengths), without 4-bit when
    bitsandbytes cannot run."""
    import train

    args = dataclasses.asdict(train.parse_args(readme_train_flags()))
    args.update(ONE_ITERATION, **(SMOKE_ARGS if smoke else {}))
    if not four_bit:
        args.update(load_in_4bit="no", judge_4bit=False, dtype="bf16")
    return args


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
# (a) the device-aware tests
# ---------------------------------------------------------------------------------------------------------------------
def pytest_configure(config):
    """pytest plugin of part (a) (`-p bench.gpu_check`): with NANOWALTZ_TEST_DTYPE=fp32, the compute dtype 'auto' is
    fp32 on a GPU too and TF32 is off, so tests written with fp32 tolerances compute in fp32."""
    if os.environ.get("NANOWALTZ_TEST_DTYPE") != "fp32":
        return
    import torch

    from nanowaltz import base_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    real = base_model.compute_dtype
    base_model.compute_dtype = lambda dtype, device, flag="--dtype": real(
        "fp32" if dtype in (None, "auto") else dtype, device, flag)


def run_tests(smoke: bool, four_bit: bool, timeout: float) -> dict:
    """(a): pytest on the GPU tests, stopped at `timeout` seconds; returns what it found (passed, failed, ...)."""
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "bench.gpu_check"]
    command += GPU_TESTS + ([] if four_bit else ["-k", FOUR_BIT_TESTS])
    if smoke:
        command.append("--collect-only")
    env = {**os.environ, "NANOWALTZ_TEST_DEVICE": "cpu" if smoke else "cuda", "NANOWALTZ_TEST_DTYPE": "fp32",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"(a) {'collecting' if smoke else 'running'} the device-aware tests (NANOWALTZ_TEST_DEVICE="
          f"{env['NANOWALTZ_TEST_DEVICE']}, compute dtype 'auto' pinned to fp32"
          f"{'' if four_bit else '; without the 4-bit tests'}; at most {timeout:.0f} s)", flush=True)
    began = time.perf_counter()
    output, timed_out, returncode = run_bounded(command, env, timeout)
    lines = output.strip().splitlines()
    print("\n".join("    " + line for line in lines[-25:]))
    counts = {word: sum(line.startswith(word.upper() + " ") for line in lines) for word in ("passed", "failed")}
    counts["errors"] = sum(line.startswith("ERROR ") for line in lines)
    if smoke:
        counts = {"collected": sum("::" in line for line in lines)}  # the test ids
    seconds = time.perf_counter() - began
    if timed_out:
        status = "STOPPED"
        print(f"(a) STOPPED at its share of the time limit ({timeout:.0f} s): " + ", ".join(
            f"{n} {word}" for word, n in counts.items()) + " before that", flush=True)
    else:
        status = "passed" if returncode == 0 else f"FAILED (exit code {returncode})"
        print(f"(a) {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "seconds": seconds, **counts}


def run_bounded(command: list, env: dict, timeout: float) -> tuple:
    """Run `command` in its own process group, stopped (SIGTERM, then SIGKILL) after `timeout` seconds; returns
    (its output so far, whether it was stopped, its exit code)."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        out.seek(0)
        return out.read(), timed_out, process.returncode


# ---------------------------------------------------------------------------------------------------------------------
# (b) one iteration of train.train, in its own process so that the time limit can stop it
# ---------------------------------------------------------------------------------------------------------------------
def prompt_label_judge(prompts, responses, prompt_labels):
    from nanowaltz.judge import Labels

    return [Labels(unsafe=label == "harmful", overrefuse=False) for label in prompt_labels]


def run_iteration(shapes: dict, settings: dict, workdir: str, device: str, results: str) -> None:
    """Build and save the random model, run one stage-2 iteration of train.train on it; each phase's measurements
    are appended to `results` (JSON lines) as soon as they are taken."""
    import torch

    import rollout
    import train
    from nanowaltz import sampler
    from nanowaltz.data import load_prompts
    from nanowaltz.judge import HFJudge

    def write(phase, **values):
        with open(results, "a") as f:
            f.write(json.dumps({"phase": phase, **values}) + "\n")

    cuda = device.startswith("cuda")

    def peaks(reset=True):
        if not cuda:
            return {"peak": float("nan"), "reserved": float("nan")}
        torch.cuda.synchronize()
        found = {"peak": torch.cuda.max_memory_allocated() / GB, "reserved": torch.cuda.max_memory_reserved() / GB}
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return found

    began = time.perf_counter()
    model_dir = os.path.join(workdir, "random-model")
    save_random_model(shapes, model_dir, device)
    write("model", seconds=time.perf_counter() - began, layers=shapes["num_hidden_layers"],
          hidden=shapes["hidden_size"], vocab=shapes["vocab_size"])
    print(f"(b) random model with {shapes['num_hidden_layers']} layers, hidden {shapes['hidden_size']}, vocab "
          f"{shapes['vocab_size']} saved in {time.perf_counter() - began:.0f} s", flush=True)

    judge = HFJudge(model_dir, device=device, load_in_4bit=settings["judge_4bit"], dtype=settings["judge_dtype"],
                    batch_size=settings["judge_batch_size"] or 16, family="wildguard", max_unparsed=1.0,
                    fallback=prompt_label_judge)
    real_judge_call = judge.__call__

    def measured_judge(prompts, responses, prompt_labels):
        peaks()  # the peak from here on is the judge's
        t0 = time.perf_counter()
        labels = real_judge_call(prompts, responses, prompt_labels)
        longest = max(len(judge.tokenizer(judge._render(p, r), add_special_tokens=False)["input_ids"])
                      for p, r in zip(prompts, responses))
        write("judge", seconds=time.perf_counter() - t0, items=len(prompts), longest_input=longest, **peaks())
        return labels

    flagged = rollout.parse_feedback('{"unsafe": true, "overrefuse": false, "reasoning": "", "feedback": "revise"}')
    real_rollout = train.rollout

    def measured_rollout(model, tokenizer, prompts, config):
        peaks()
        t0 = time.perf_counter()
        trajectories = real_rollout(model, tokenizer, prompts, config)
        turns = [turn for t in trajectories for turn in t.answers + t.feedbacks]
        write("rollout", seconds=time.perf_counter() - t0, **peaks(),
              longest=max(len(turn.context_ids) + len(turn.action_ids) for turn in turns),
              answers=[len(t.answers[0].action_ids) for t in trajectories],
              feedback=[len(f.action_ids) for t in trajectories for f in t.feedbacks],
              revisions=[len(r.action_ids) for t in trajectories for r in t.answers[1:]])
        return trajectories

    fields = {k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(train.Args)}}
    args = train.Args(**{**fields, "model": model_dir, "out": os.path.join(workdir, "run"), "judge": "default"})
    prompts = load_prompts(os.path.join(REPO, "data", "prompts.jsonl"), split="train")
    with mock.patch.object(sampler, "stop_token_ids", lambda model, tokenizer: set()), \
            mock.patch.object(rollout, "parse_feedback", lambda text: dataclasses.replace(flagged, feedback=text)), \
            mock.patch.object(train, "rollout", measured_rollout):
        summary = train.train(args, judge=measured_judge, prompts=prompts)
    context = float("nan")
    if cuda:  # what the device uses beyond torch's allocator: the CUDA context (and any other process)
        free, total = torch.cuda.mem_get_info()
        context = (total - free - torch.cuda.memory_reserved()) / GB
    write("update", **peaks(reset=False), context=context, record=summary["history"][-1],
          recompute_old_logprobs=args.recompute_old_logprobs, load_in_4bit=args.load_in_4bit,
          judge_4bit=args.judge_4bit, rows=args.rollout_batch_size, micro_rows=args.micro_batch_size,
          judge_rows=judge.batch_size)


def run_part_b(smoke: bool, four_bit: bool, workdir: str, timeout: float) -> dict:
    """(b) in a child process (`--part-b`), stopped at `timeout` seconds; returns the phases it measured."""
    results = os.path.join(workdir, "measured.jsonl")
    timeout = max(timeout, 1.0)  # what is left of the limit after (a); at least a second to start
    command = [sys.executable, os.path.abspath(__file__), "--part-b", results, "--workdir", workdir]
    command += (["--smoke"] if smoke else []) + ([] if four_bit else ["--no-4bit"])
    print(f"(b) one stage-2 iteration of README's command{' at toy size' if smoke else ''}"
          f"{'' if four_bit else ', in bf16 (no 4-bit: ' + four_bit_unavailable(smoke) + ')'}; at most "
          f"{timeout:.0f} s", flush=True)
    began = time.perf_counter()
    output, timed_out, returncode = run_bounded(command, dict(os.environ), timeout)
    lines = [line for line in output.strip().splitlines() if "it/s]" not in line and "s/it]" not in line]
    print("\n".join("    " + line for line in lines[-15:]))
    phases = {}
    if os.path.exists(results):
        with open(results) as f:
            for line in f:
                record = json.loads(line)
                phases[record.pop("phase")] = record
    status = ("STOPPED" if timed_out else "complete" if returncode == 0 and "update" in phases
              else f"FAILED (exit code {returncode})")
    if timed_out:
        done = ", ".join(phases) or "nothing"
        print(f"(b) STOPPED at its share of the time limit ({timeout:.0f} s); measured before that: {done}")
    return {"status": status, "seconds": time.perf_counter() - began, "phases": phases}


def budget_at(phases: dict, four_bit: bool) -> dict:
    """README's budget (bench/memory.py, measured per layer on a CPU) at this run's sequence lengths; {} when the
    run is not README's NF4 config or the measurements are missing."""
    from bench import memory

    rollout, update = phases.get("rollout"), phases.get("update")
    if not four_bit or rollout is None or update is None or not os.path.exists(memory.RESULTS):
        return {}
    with open(memory.RESULTS) as f:
        measured = json.load(f)
    new = max(rollout["revisions"] or [0])
    lengths = memory.Lengths(revision_context=rollout["longest"] - new, revision_new=new,
                             judge_input=phases.get("judge", {}).get("longest_input"))
    recipe = {"rollout_rows": update["rows"], "micro_rows": update["micro_rows"], "judge_rows": update["judge_rows"]}
    return memory.budget(measured, lengths, recipe)


def report(tests: dict, part_b: dict, four_bit: bool, limit: float, seconds: float) -> None:
    """What (b) measured, then the summary table of both parts."""
    gb = lambda x: "n/a" if x is None or math.isnan(x) else f"{x:.1f} GB"  # noqa: E731
    span = lambda xs: f"{len(xs)} x {min(xs)}-{max(xs)}" if xs else "none"  # noqa: E731
    phases = part_b["phases"]
    budget = budget_at(phases, four_bit)
    if "rollout" in phases:
        r = phases["rollout"]
        print(f"\n(b) answers {span(r['answers'])} tokens, feedback {span(r['feedback'])}, revisions "
              f"{span(r['revisions'])}; longest sequence {r['longest']} tokens")
    rows = [(name, phases[name]) for name in ("rollout", "judge", "update") if name in phases]
    if rows:
        print(f"    {'phase':8s} {'peak allocated':>15s} {'peak reserved':>14s} {'README budget':>14s} {'seconds':>8s}")
        for name, values in rows:
            seconds_of = values.get("seconds", values.get("record", {}).get("time_update", float("nan")))
            print(f"    {name:8s} {gb(values['peak']):>15s} {gb(values['reserved']):>14s} "
                  f"{gb(budget.get(name)):>14s} {seconds_of:8.1f}")
        if budget:
            print("    (README budget: bench/memory.py, measured per layer on a CPU, extrapolated to this run's lengths; "
                  "without the CUDA context)")
    update = phases.get("update")
    if update is not None:
        record = update["record"]
        if not math.isnan(update["context"]):
            peak = max(v["reserved"] for _, v in rows) + update["context"]
            print(f"    device memory at the peak, with the CUDA context ({update['context']:.1f} GB): {peak:.1f} GB; "
                  f"fits a 24 GB card ({CARD_24GB:.1f} GB): {'yes' if peak <= CARD_24GB else 'NO'}")
        print(f"    rollout: {record['tokens_per_s']:.0f} tokens/s ({record['time_rollout']:.1f} s); judge: "
              f"{record['time_judge']:.1f} s; update: {record['time_update']:.1f} s")
        for agent in ("conversation", "feedback"):
            key = f"{agent}/sampling_logprob_mismatch"
            if key in record:
                print(f"    sampling vs training log-probs, {agent}: max |diff| {record[key]:.4f}, mean "
                      f"{record[key + '_mean']:.5f} nats per token")
        if not update["recompute_old_logprobs"]:
            print("    (--recompute-old-logprobs was off, so the mismatch was not measured)")
    measured = ", ".join(f"{name} {gb(v['peak'])}" for name, v in rows) or "nothing"
    print(f"\nsummary (time limit {limit:.0f} s, used {seconds:.0f} s)")
    print(f"  {'part':36s} {'status':22s} {'seconds':>7s}  result")
    counts = ", ".join(f"{n} {word}" for word, n in tests.items() if word not in ("status", "seconds"))
    print(f"  {'(a) device-aware tests':36s} {tests['status']:22s} {tests['seconds']:7.0f}  {counts}")
    print(f"  {'(b) one iteration of README config':36s} {part_b['status']:22s} {part_b['seconds']:7.0f}  "
          f"peak allocated: {measured}{'' if four_bit else ' (bf16, no 4-bit)'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the same code path, in seconds")
    parser.add_argument("--skip-tests", action="store_true", help="skip (a), the device-aware tests")
    parser.add_argument("--workdir", default=None, help="where the random model (~16 GB in bf16) and the run go "
                                                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help=f"seconds for the whole check: (a) {TESTS_SHARE * 100:.0f}%% of it, (b) the rest")
    parser.add_argument("--part-b", default=None, help=argparse.SUPPRESS)  # the child process of (b)
    parser.add_argument("--no-4bit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part_b:
        import torch

        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        run_iteration(TINY if args.smoke else LLAMA_31_8B, run_settings(args.smoke, not args.no_4bit), args.workdir,
                      device, args.part_b)
        return 0
    began = time.perf_counter()
    problems = check_environment(args.smoke)
    if problems:
        for problem in problems:
            print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    from bench.machine import machine_info

    print(machine_info())
    why_not = four_bit_unavailable(args.smoke)
    if why_not:
        print(f"gpu_check: {why_not}: NF4 4-bit is skipped; the 4-bit tests are left out and (b) runs in bf16")
    four_bit = not why_not
    if args.skip_tests:
        tests = {"status": "skipped", "seconds": 0.0}
    else:
        tests = run_tests(args.smoke, four_bit, TESTS_SHARE * args.time_limit)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nanowaltz-gpu-check-")
    try:
        part_b = run_part_b(args.smoke, four_bit, workdir, args.time_limit - (time.perf_counter() - began))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(tests, part_b, four_bit, args.time_limit, time.perf_counter() - began)
    tests_ok = tests["status"] in ("passed", "skipped")
    return 0 if tests_ok and part_b["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
