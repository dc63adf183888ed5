"""Benchmark: time and peak memory of one WaltzRL training iteration, split into rollout, judge and update.

One iteration of train.train (docs/method.md "Training"; arXiv 2510.08240 Sec. 3.3) is: two-agent rollout of a batch of
prompts, judge labels for every answer, then rewards -> single-agent samples -> advantages -> old/reference
log-probs -> PPO epochs for each trained agent. We run the REAL train.train (no copy of its loop) with a small Args:
stage1_iterations=0 and stage2_iterations=N, so every measured iteration is a stage-2 iteration where BOTH agents
are updated, and read its per-iteration history (time_rollout, time_judge, time_update). The grid varies
    response length   conversation_max_new_tokens (c_0 and the revision)
    batch             prompts_per_iteration (one trajectory per prompt)
and reports how each part grows: the exponent p of time ~ size^p, fitted by least squares on
log(y) = c + p_len * log(length) + p_batch * log(batch) over all grid points.

Measurement choices (say them when you quote the numbers):
- EOS is suppressed for the conversation agent (by default; --allow-eos turns it off) so every answer really has
  `length` tokens: sampler.stop_token_ids is patched to return no stop token while the conversation adapter is
  active. The feedback agent stops normally (and early-stops on "ok" labels), so its length is what the model
  chooses, up to Args.feedback_max_new_tokens. Other Args keep train.py's defaults (2 PPO epochs, minibatch 8, ...).
- Each (length, batch, repeat) runs in a fresh subprocess: peak RSS is monotone over a process's life, so one
  process per configuration keeps configurations from hiding each other's peaks. Inside the worker, the phases are
  wrapped (train.rollout, train.judge_trajectories, train.make_samples ... train.update_agent) and before each phase
  the kernel's peak-RSS counter is reset by writing "5" to /proc/self/clear_refs; VmHWM after the phase is that
  phase's peak. We report peak RSS of the iteration (absolute: includes Python, torch, the base model and the judge)
  and "+MB" = peak above the RSS at the start of the phase (activations, KV cache, logits, gradients; what grows).
  MALLOC_MMAP_THRESHOLD_ is set in the worker so freed large blocks go back to the OS and RSS tracks live memory.
  Without clear_refs (not Linux, or not writable) only the whole-process ru_maxrss is available (then the
  per-phase columns are empty). On CUDA, use torch.cuda.max_memory_allocated instead (not done here: CPU project).
- Warm-up: the judge (default: prompt label + MiniLM refusal detector) is called once before training, so its
  one-time model load is not in time_judge; one forward+backward runs right after train.train attaches the adapters
  (training_run.attach_agents is wrapped), which pages the mmapped weights into RSS and pays one-time kernel set-up
  outside the measured iteration. --warmup-iterations additionally runs and drops whole iterations (off by default).
- Ratios ("x base") are against the smallest configuration, measured in the same run.

Default (reduced, about 5 minutes on 2 CPU cores): lengths 16,32,64 and batches 1,2,4 as a "cross" design, i.e.
the length sweep at the smallest batch plus the batch sweep at the smallest length (5 configurations, not 9); the
least-squares fit is the same. --design grid runs the full product. --full is the spec grid 128,256,512 x 4,8,16
(full product): hours on a CPU, meant for a GPU box. One stage-2 iteration of the default model costs about half a
minute at length 16, batch 1 on one core, most of it in the update (a forward + backward over every sample's whole
context, which is mostly the system prompts).

    HF_HUB_OFFLINE=1 python bench/train_step.py
    HF_HUB_OFFLINE=1 python bench/train_step.py --design grid --repeats 2
    HF_HUB_OFFLINE=1 python bench/train_step.py --full
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# Run as `python bench/train_step.py`, sys.path[0] is bench/, where bench/rollout.py would shadow the project's.
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402

from bench.machine import machine_info  # noqa: E402

PHASES = ("rollout", "judge", "update")
FULL_LENGTHS, FULL_BATCHES = "128,256,512", "4,8,16"


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration, one fresh process
# ---------------------------------------------------------------------------------------------------------------------
def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


class PhaseMemory:
    """Wraps train.py's phase functions to record each phase's peak RSS (see the module docstring)."""

    def __init__(self):
        self.records = []  # one dict per iteration: {phase: {"start_mb", "peak_mb"}}
        self.can_reset = _reset_peak()

    def begin(self, phase):
        if phase == "rollout":
            self.records.append({})
        if self.can_reset:
            _reset_peak()
        self.records[-1][phase] = {"start_mb": _status_mb("VmRSS"), "peak_mb": 0.0}

    def end(self, phase):
        if self.can_reset:
            entry = self.records[-1][phase]
            entry["peak_mb"] = max(entry["peak_mb"], _status_mb("VmHWM"))

    def wrap(self, module, name, phase, begins=True, ends=True):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            if begins:
                self.begin(phase)
            result = original(*args, **kwargs)
            if ends:
                self.end(phase)
            return result

        setattr(module, name, wrapped)


def suppress_conversation_eos(sampler_module):
    """Patch sampler.stop_token_ids: no stop token while the conversation adapter is active (answers hit the limit)."""
    original = sampler_module.stop_token_ids

    def stop_token_ids(model, tokenizer):
        return set() if getattr(model, "active_adapter", None) == "conversation" else original(model, tokenizer)

    sampler_module.stop_token_ids = stop_token_ids


def worker(args) -> dict:
    from nanowaltz import sampler
    import train
    from nanowaltz import training_run
    from nanowaltz.judge import load_judge

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.allow_eos:
        suppress_conversation_eos(sampler)
    judge = load_judge(args.judge)
    judge(["warm-up"], ["Sure, here it is."], ["benign"])  # loads the refusal detector's embedder once
    memory = PhaseMemory()
    # Warm the model up inside train.train, right after the adapters are attached: the first forward/backward pages
    # the mmapped safetensors weights into RSS and pays one-time kernel set-up, which would otherwise be counted in
    # the first iteration's rollout. The throw-away gradients are cleared, so the optimizers start as in training.
    attach_agents = training_run.attach_agents

    def attach_agents_and_warm_up(base, **lora):
        model = attach_agents(base, **lora)
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=device)).logits.float().mean().backward()
        model.zero_grad(set_to_none=True)
        return model

    training_run.attach_agents = attach_agents_and_warm_up
    # train.py imported these names into its own namespace, so that is where the wrappers must go.
    memory.wrap(train, "rollout", "rollout")
    memory.wrap(train, "judge_trajectories", "judge")
    memory.wrap(train, "make_samples", "update", ends=False)  # the update phase starts with make_samples ...
    memory.wrap(train, "update_agent", "update", begins=False)  # ... and its peak is read after every agent update
    iterations = args.warmup_iterations + 1
    with tempfile.TemporaryDirectory(prefix="nanowaltz-bench-") as out:
        train_args = train.Args(model=args.model, judge=args.judge, out=out, stage1_iterations=0,
                                stage2_iterations=iterations, prompts_per_iteration=args.batch,
                                conversation_max_new_tokens=args.length, save_every=10 ** 9, seed=args.seed)
        summary = train.train(train_args, judge=judge)
    record, mem = summary["history"][-1], memory.records[-1]
    generated = record["tokens_per_s"] * record["time_rollout"]
    result = {"length": args.length, "batch": args.batch, "generated_tokens": round(generated),
              "ftr": record["ftr"], "threads": torch.get_num_threads(),
              "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    for phase in PHASES:
        result[f"time_{phase}"] = record[f"time_{phase}"]
        if memory.can_reset:
            result[f"peak_{phase}_mb"] = mem[phase]["peak_mb"]
            result[f"grow_{phase}_mb"] = mem[phase]["peak_mb"] - mem[phase]["start_mb"]
    result["time_total"] = sum(result[f"time_{p}"] for p in PHASES)
    if memory.can_reset:
        result["peak_iteration_mb"] = max(mem[p]["peak_mb"] for p in PHASES)
        result["grow_iteration_mb"] = result["peak_iteration_mb"] - mem["rollout"]["start_mb"]
    for agent in ("feedback", "conversation"):
        result[f"{agent}_samples"] = record.get(f"{agent}/samples", 0)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Parent: spawn the grid, print the table and the growth exponents
# ---------------------------------------------------------------------------------------------------------------------
def spawn(length, batch, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--length", str(length), "--batch", str(batch),
           "--model", args.model, "--judge", args.judge, "--seed", str(args.seed),
           "--warmup-iterations", str(args.warmup_iterations)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.allow_eos:
        cmd += ["--allow-eos"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker for length={length} batch={batch} failed (exit code {proc.returncode}); "
                         f"its stderr is above")
    return json.loads(lines[-1][len("RESULT "):])


def growth_exponents(rows, key):
    """Least-squares slopes of log(rows[key]) on log(length) and log(batch); None for an axis with one value."""
    import numpy as np

    points = [r for r in rows if r.get(key) is not None and r[key] > 0]
    axes = [a for a in ("length", "batch") if len({r[a] for r in points}) > 1]
    if not axes or len(points) < len(axes) + 1:
        return {a: None for a in ("length", "batch")}
    x = np.array([[1.0] + [math.log(r[a]) for a in axes] for r in points])
    y = np.array([math.log(r[key]) for r in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {a: (float(coef[1 + axes.index(a)]) if a in axes else None) for a in ("length", "batch")}


def print_report(rows, has_memory):
    base = rows[0]
    print("\n## One stage-2 training iteration (both agents updated); times in seconds, memory in MB")
    head = (f"{'len':>4} {'batch':>5} | {'rollout':>7} {'judge':>6} {'update':>7} {'total':>7} {'x base':>6} | "
            f"{'gen tok':>7} {'FTR':>4} | {'peak RSS':>8} {'+rollout':>8} {'+update':>8} {'+iter':>7}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        mem = (f"{r['peak_iteration_mb']:>8.0f} {r['grow_rollout_mb']:>8.0f} {r['grow_update_mb']:>8.0f} "
               f"{r['grow_iteration_mb']:>7.0f}" if has_memory else f"{r['process_peak_mb']:>8.0f} {'-':>8} {'-':>8} "
                                                                     f"{'-':>7}")
        print(f"{r['length']:>4} {r['batch']:>5} | {r['time_rollout']:>7.1f} {r['time_judge']:>6.2f} "
              f"{r['time_update']:>7.1f} {r['time_total']:>7.1f} {r['time_total'] / base['time_total']:>6.2f} | "
              f"{r['generated_tokens']:>7} {r['ftr']:>4.2f} | {mem}")
    print("len = conversation_max_new_tokens (EOS suppressed unless --allow-eos); batch = prompts per iteration; "
          "x base = total time / total time of the first row; gen tok = tokens generated in the rollout "
          "(answers + feedback + revisions); peak RSS = peak resident memory during the iteration (whole process: "
          "Python, torch, base model, judge); +phase = that phase's peak above the RSS when it started.")

    keys = [("time_rollout", "rollout time"), ("time_judge", "judge time"), ("time_update", "update time"),
            ("time_total", "total time")]
    if has_memory:
        keys += [("grow_rollout_mb", "rollout memory (+MB)"), ("grow_update_mb", "update memory (+MB)"),
                 ("grow_iteration_mb", "iteration memory (+MB)"), ("peak_iteration_mb", "peak RSS (absolute)")]
    else:
        keys += [("process_peak_mb", "process peak RSS")]
    print("\n## Growth exponents p (y ~ length^p_len * batch^p_batch, least squares on logs)")
    print(f"{'quantity':>24} | {'p_len':>6} | {'p_batch':>7}")
    fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
    for key, label in keys:
        exps = growth_exponents(rows, key)
        print(f"{label:>24} | {fmt(exps['length']):>6} | {fmt(exps['batch']):>7}")
    print("p = 1: linear; p < 1: a fixed cost (the prompt contexts, the system prompts, the base model's own memory) "
          "still dominates at these sizes.")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time and peak memory of one WaltzRL training iteration (rollout / judge / update) over a grid "
                    "of response lengths and batch sizes, each configuration in a fresh process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", default="16,32,64",
                        help="comma-separated conversation_max_new_tokens values (response length)")
    parser.add_argument("--batches", default="1,2,4", help="comma-separated prompts_per_iteration values (batch)")
    parser.add_argument("--design", choices=("cross", "grid"), default="cross",
                        help="cross: length sweep at the smallest batch + batch sweep at the smallest length; "
                             "grid: every (length, batch) pair")
    parser.add_argument("--full", action="store_true",
                        help=f"the spec grid: lengths {FULL_LENGTHS} x batches {FULL_BATCHES}, every pair "
                             f"(hours on a CPU)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh-process runs per configuration (interleaved over the grid); medians reported")
    parser.add_argument("--warmup-iterations", type=int, default=0,
                        help="iterations run and discarded before the measured one, in each process")
    parser.add_argument("--allow-eos", action="store_true",
                        help="let the conversation agent stop at EOS (then lengths are limits, not reached lengths)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every worker; None = torch's default")
    parser.add_argument("--model", default="default",
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    parser.add_argument("--judge", default="default", help="judge spec (judge.py), e.g. 'default' or 'default:phrase'")
    parser.add_argument("--seed", type=int, default=0, help="train.Args.seed (prompt choice and sampling)")
    parser.add_argument("--json", default=None, help="also write all rows (every repeat) to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.full:
        args.lengths, args.batches, args.design = FULL_LENGTHS, FULL_BATCHES, "grid"
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        batches = [int(x) for x in args.batches.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--lengths and --batches must be comma-separated integers, got {args.lengths!r}, "
                     f"{args.batches!r}")
    if not lengths or not batches or min(lengths + batches) < 1 or args.repeats < 1 or args.warmup_iterations < 0:
        parser.error("--lengths, --batches and --repeats need positive values, --warmup-iterations >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine_info())
    print(f"{args.design}: lengths {lengths}, batches {batches}, {args.repeats} repeat(s), model {args.model}, judge "
          f"{args.judge}, EOS {'allowed' if args.allow_eos else 'suppressed for the conversation agent'}")
    lengths, batches = sorted(set(lengths)), sorted(set(batches))
    if args.design == "grid":
        grid = [(length, batch) for length in lengths for batch in batches]
    else:
        grid = [(length, batches[0]) for length in lengths] + [(lengths[0], batch) for batch in batches[1:]]
    runs = {config: [] for config in grid}
    began = time.perf_counter()
    for r in range(args.repeats):
        for length, batch in grid:
            t0 = time.perf_counter()
            result = spawn(length, batch, args)
            runs[(length, batch)].append(result)
            print(f"  repeat {r + 1}/{args.repeats} length {length:>3} batch {batch:>2}: iteration "
                  f"{result['time_total']:.1f}s (process {time.perf_counter() - t0:.0f}s)", flush=True)
    rows = []
    for config in grid:
        results = runs[config]
        row = dict(results[0])
        for key, value in results[0].items():
            if isinstance(value, float) and key not in ("length", "batch"):
                row[key] = statistics.median(x[key] for x in results)
        rows.append(row)
    print_report(rows, has_memory="peak_iteration_mb" in rows[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "runs": [x for c in grid for x in runs[c]]}, f, indent=1)
    print(f"\ntotal {time.perf_counter() - began:.0f}s; {machine_info()}")


if __name__ == "__main__":
    main()
