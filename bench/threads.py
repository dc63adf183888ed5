"""Benchmark: OpenMP wait settings and thread counts for CPU decoding, on an idle machine and beside a busy process.

Why (cpu_threads.py): PyTorch's OpenMP threads spin while they wait for the next kernel. Alone on the machine that
is fastest; beside another busy process it can make a run several times slower, and OMP_WAIT_POLICY=PASSIVE (never
spin) fixes that at a cost when the machine is idle. This script measures the options so the default can be chosen
by numbers: the one that is good in both situations.

How: OpenMP reads its settings once, when torch is loaded, so every setting runs in a fresh subprocess (this file
with --worker) that times a fixed short decoding loop: the model (default: the embedded SmolLM2-135M-Instruct, fp32)
prefills a batch of random contexts once, then runs --steps decoding steps with a KV cache, feeding back its greedy
tokens (sampler.sample's inner loop without the bookkeeping). It reports the median seconds per step, the CPU
seconds per wall second its threads used (spinning counts as CPU time) and the involuntary context switches per step
(a thread preempted while it had work). Every setting is measured idle and with one competitor: a pure-Python busy
loop that this script starts just before the run and stops right after (one busy core, like a second job).

Settings (--settings picks some): `default` sets nothing (libgomp spins ~300,000 iterations, a few ms); `project` is
what train.py, infer.py and eval.py do: the worker imports cpu_threads first, which looks at the machine's load (the
busy loop included) and chooses the wait policy and the thread count (its choice is printed; its row shows the
thread counts it chose idle/busy); `passive` and `active` set OMP_WAIT_POLICY; `spin=N` sets GOMP_SPINCOUNT=N. Each
setting but `project` runs with every thread count in --threads (default: 1 and all cores).

    python bench/threads.py                                    all settings, 1 and all threads (~5 min on 2 cores)
    python bench/threads.py --settings default,project,passive --threads 2 --steps 40
    python bench/threads.py --situations idle --steps 2 --context 8 --settings project    (smoke test)

Run it on an otherwise quiet machine: the "idle" column is only idle if nothing else runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "default": {},
    "project": {},  # nothing set here: the worker imports cpu_threads, which decides from the load it sees
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin=1000": {"GOMP_SPINCOUNT": "1000"},
    "spin=100000": {"GOMP_SPINCOUNT": "100000"},
}
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker(args) -> None:
    """In the fresh subprocess: time the decoding loop and print one JSON line."""
    import resource

    sys.path.insert(0, REPO)
    choice = "not imported"
    if args.project:
        from nanowaltz import cpu_threads  # before torch, as in train.py: its choice depends on the load at this moment

        choice = cpu_threads.CHOICE
    import torch
    from transformers import DynamicCache

    from nanowaltz.base_model import cache_keyword, load_base

    model, _ = load_base(args.model, load_in_4bit=False, device="cpu", dtype="fp32")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), generator=generator)
    cache = DynamicCache(config=model.config)
    with_cache = {cache_keyword(model): cache}
    step_seconds = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache)
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                began = time.perf_counter()
            start = time.perf_counter()
            out = model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), use_cache=True, logits_to_keep=1,
                        **with_cache)
            step_seconds.append(time.perf_counter() - start)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    print(json.dumps({"step_s": statistics.median(step_seconds[args.warmup:]), "cpu_per_wall": cpu / wall,
                      "involuntary_switches_per_step": (after.ru_nivcsw - usage.ru_nivcsw) / args.steps,
                      "threads": torch.get_num_threads(), "cpu_threads": choice}))


def run_setting(args, variables: dict, threads, busy: bool, project: bool = False) -> dict:
    """One fresh subprocess with exactly these OpenMP variables (inherited ones removed), maybe beside a competitor;
    threads None leaves the thread count to the worker (the project setting chooses its own)."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env.update(variables)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model, "--batch",
               str(args.batch), "--context", str(args.context), "--steps", str(args.steps), "--warmup",
               str(args.warmup)] + (["--project"] if project else [])
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({variables}, {threads} threads):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Seconds per decoding step under OpenMP wait settings and thread counts, idle and beside one "
                    "busy process; each setting in a fresh subprocess.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated settings, from {', '.join(SETTINGS)}, or spin=N for any N")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts (default: 1 and the number of cores)")
    parser.add_argument("--situations", default="idle,busy", help="idle, busy (one competing process) or both")
    parser.add_argument("--model", default="default",
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    parser.add_argument("--batch", type=int, default=8, help="rows decoded together")
    parser.add_argument("--context", type=int, default=128, help="tokens prefilled before decoding")
    parser.add_argument("--steps", type=int, default=20, help="timed decoding steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decoding steps before them")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--project", action="store_true", help=argparse.SUPPRESS)  # worker: import cpu_threads
    args = parser.parse_args(argv)
    if min(args.batch, args.context, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch, --context and --steps must be >= 1 and --warmup >= 0")
    if args.worker:
        return worker(args)

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    grid = {}
    for name in names:
        if name in SETTINGS:
            grid[name] = SETTINGS[name]
        elif name.startswith("spin=") and name[5:].isdigit():
            grid[name] = {"GOMP_SPINCOUNT": name[5:]}
        else:
            parser.error(f"--settings: unknown setting {name!r} (known: {', '.join(SETTINGS)}, spin=N)")
    cores = os.cpu_count() or 1
    try:
        thread_counts = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, cores})
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    situations = [s.strip() for s in args.situations.split(",") if s.strip()]
    if not situations or set(situations) - {"idle", "busy"} or min(thread_counts) < 1:
        parser.error("--situations takes idle, busy or both; --threads must be >= 1")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cores} cores, load average {load:.1f} (the idle column is only idle on a quiet machine); model "
          f"{args.model}, batch {args.batch}, context {args.context}, {args.steps} timed steps", flush=True)
    results = []
    began = time.perf_counter()
    for name, variables in grid.items():
        for threads in ([None] if name == "project" else thread_counts):  # project: its own thread count
            row = {"setting": name}
            for situation in situations:
                row[situation] = run_setting(args, variables, threads, busy=situation == "busy",
                                             project=name == "project")
            row["threads"] = "/".join(str(t) for t in dict.fromkeys(row[s]["threads"] for s in situations))
            results.append(row)
            print(f"  {name}, {row['threads']} thread(s): " + ", ".join(
                f"{s} {1000 * row[s]['step_s']:.1f} ms/step" + (f" ({row[s]['cpu_threads']})" if name == "project"
                                                                else "") for s in situations), flush=True)

    best = {s: min(r[s]["step_s"] for r in results) for s in situations}
    head = (f"{'setting':>12} | {'threads':>7} | " + " | ".join(
        f"{s + ' ms/step':>13} | {'x best':>6} | {'CPU/wall':>8} | {'invol./step':>11}" for s in situations)
        + (" | worst x best" if len(situations) > 1 else ""))
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        cells = [f"{1000 * r[s]['step_s']:>13.1f} | {r[s]['step_s'] / best[s]:>6.2f} | {r[s]['cpu_per_wall']:>8.2f} | "
                 f"{r[s]['involuntary_switches_per_step']:>11.1f}" for s in situations]
        worst = max(r[s]["step_s"] / best[s] for s in situations)
        print(f"{r['setting']:>12} | {r['threads']:>7} | " + " | ".join(cells)
              + (f" | {worst:>12.2f}" if len(situations) > 1 else ""))
    if len(situations) > 1:
        pick = min(results, key=lambda r: max(r[s]["step_s"] / best[s] for s in situations))
        print(f"good in both (smallest worst-case ratio to the best of its column): {pick['setting']} with "
              f"{pick['threads']} thread(s)")
    print(f"x best = time / the fastest row of the same column; CPU/wall = CPU seconds used per wall second (spinning "
          f"included); invol./step = involuntary context switches per step. Total {time.perf_counter() - began:.0f}s.")


if __name__ == "__main__":
    main()
