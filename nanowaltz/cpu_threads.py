"""OpenMP threads on a CPU shared with other processes: how they wait and how many. Imported first by train.py,
infer.py and eval.py.

PyTorch's CPU kernels run on an OpenMP thread team (GNU libgomp in the pip wheels). When a thread finishes its part
of a parallel region it waits for the next region: first it spins (libgomp: ~300,000 iterations, a few ms, by
default), then it sleeps. A decoding step is hundreds of short kernels, so the wait policy matters both ways:
- alone on the machine, spinning is fastest: the thread is awake when the next kernel starts;
- beside another busy process it is the slowest: a waiting thread spins on a core that a descheduled teammate needs,
  and every region waits for its slowest thread. OMP_WAIT_POLICY=PASSIVE (never spin) avoids that, but every region
  then pays a wake-up, which slows an idle machine down.

No single setting is good in both situations (docs/performance.md, "CPU threads on a shared machine"), so the choice
is made per run, from what the machine is doing when the process starts: we read /proc/stat twice, WINDOW_S apart,
before torch is loaded, and if other processes keep at least BUSY_CORES cores busy, threads sleep while they wait
(OMP_WAIT_POLICY=PASSIVE) and there is one thread per core the others leave entirely free (OMP_NUM_THREADS =
floor(cores - busy cores), at least 1); otherwise nothing is set and libgomp spins on every core as usual.

Why fewer threads: the kernel shares the CPU between processes, not threads, so beside a busy process ours gets
about the cores left free whatever its thread count, and an extra thread on those cores only adds hand-overs. One
thread also costs little on an idle machine (decoding is bound by memory bandwidth, which one core nearly
saturates), so a wrong "busy" reading is cheap. The window is long enough that a short burst of another process does
not pass for a busy machine. The limit: a process that starts *after* ours is not seen (then export
OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS).

Rules: OpenMP reads these variables once, when torch is loaded, so this module must be imported before torch (each
entry point imports it first). It only decides when you have not: export OMP_WAIT_POLICY, GOMP_SPINCOUNT or
KMP_BLOCKTIME yourself and nothing is added; export OMP_NUM_THREADS and the thread count is yours. On systems
without /proc/stat nothing is set. `CHOICE` records what was decided and why; `describe()` says it at start.

The thread count changes results, not only speed: a kernel's reductions are split over the threads, so 1 and 2
threads round differently and a run drifts apart within a few iterations (the wait policy changes only speed). A run
therefore records what its numbers depend on (`numerics_record`: threads, wait policy, ranks, CPU, device, package
versions) in its checkpoints, args.json and eval.py's results.json; `--resume` reuses the recorded thread count
(`reuse_threads`) and names whatever else differs (`numerics_differences`).

Being the first import of every entry point, this module also makes a Ctrl-C that lands while the libraries load
(before an entry point's own handling) end with one line instead of a traceback.
"""
import math
import os
import platform
import sys
import time

BUSY_CORES = 0.25  # other processes' CPU use, in cores, from which our threads sleep instead of spinning
WINDOW_S = 0.5  # how long the machine is watched before the choice
USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def read_cpu_times(path="/proc/stat"):
    """(busy, total) jiffies summed over all CPUs, and the number of CPUs, from /proc/stat; None if unreadable."""
    try:
        with open(path) as stat:
            lines = stat.read().splitlines()
        values = [int(v) for v in lines[0].split()[1:]]  # user nice system idle iowait irq softirq steal ...
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total, cpus


def busy_cores_elsewhere(window_s=WINDOW_S, read=read_cpu_times, sleep=time.sleep):
    """How many cores other processes kept busy over the window (this process sleeps through it); None if unknown."""
    first = read()
    sleep(window_s)
    second = read()
    if first is None or second is None or second[1] <= first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * second[2]


def apply(environ=os.environ, busy_cores=None, cores=None) -> dict:
    """Decide the wait policy and thread count unless the user did; returns the variables set (busy_cores: measured
    if None; cores: this process's usable cores if None)."""
    global CHOICE
    if any(name in environ for name in USER_VARIABLES):
        CHOICE = "yours (an OpenMP wait variable was set)"
        return {}
    if busy_cores is None:
        busy_cores = busy_cores_elsewhere()
    if busy_cores is None or busy_cores < BUSY_CORES:
        CHOICE = "spin (libgomp default): " + ("load unknown" if busy_cores is None else
                                                 f"other processes used {busy_cores:.2f} cores at start")
        return {}
    chosen = {"OMP_WAIT_POLICY": "PASSIVE"}
    if "OMP_NUM_THREADS" not in environ:  # one thread per core the others leave entirely free, at least one
        cores = usable_cores() if cores is None else cores
        chosen["OMP_NUM_THREADS"] = str(max(1, math.floor(cores - busy_cores)))
    environ.update(chosen)
    CHOICE = " ".join(f"{name}={value}" for name, value in chosen.items()) + \
        f": other processes used {busy_cores:.2f} cores at start"
    return chosen


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe() -> str:
    """The thread count and wait policy in force, and why: the line a run prints at start."""
    import torch

    threads = torch.get_num_threads()
    return f"CPU threads: {threads}, {wait_policy()} (the choice at start: {CHOICE})"


def wait_policy() -> str:
    return ("sleeping while they wait" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
            else "spinning while they wait")


def cpu_kind() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics_record(world_size: int = 1, device="cpu") -> dict:
    """What a run's numbers depend on beyond its settings and seed, for its checkpoints and reproducibility records."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    device = str(device)
    return {"threads": torch.get_num_threads(), "wait_policy": wait_policy(), "thread_choice": CHOICE,
            "world_size": world_size, "cpu": cpu_kind(),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "python": platform.python_version(), "torch": torch.__version__,
            **{package: installed(package) for package in LOCKED_PACKAGES}}


# The packages besides torch whose versions a run's numbers may depend on: recorded with every run and pinned, with
# torch, in requirements-lock.txt (the versions README "Results" was measured with).
LOCKED_PACKAGES = ("transformers", "peft", "bitsandbytes", "tokenizers", "numpy")


# How each recorded difference shows in the results (thread_choice is the reason, not a number that matters).
EFFECT = {"threads": "other rounding", "wait_policy": "speed only", "world_size": "other sampling noise per rank",
          "cpu": "other rounding", "device": "other rounding", "python": "", "torch": "other kernels",
          "transformers": "", "peft": "", "bitsandbytes": "other 4-bit kernels", "tokenizers": "",
          "numpy": "other judge fits"}


def numerics_differences(saved: dict | None, now: dict) -> list:
    """'name old -> new (effect)' for each recorded item that differs between a run's record and this process's."""
    saved = saved or {}
    return [f"{name} {saved[name]} -> {now[name]}" + (f" ({EFFECT[name]})" if EFFECT[name] else "")
            for name in EFFECT if name in saved and name in now and saved[name] != now[name]]


def reuse_threads(saved: dict | None) -> str | None:
    """--resume: run with the thread count recorded by the checkpoint's run (whatever this machine's load chose),
    unless the user exported OMP_NUM_THREADS; returns a line saying what changed, or None."""
    import torch

    if not saved or "threads" not in saved or saved["threads"] == torch.get_num_threads():
        return None
    now = torch.get_num_threads()
    if USER_THREADS:
        return (f"OMP_NUM_THREADS={now} is yours, the checkpoint's run had {saved['threads']} thread(s): results will "
                f"round differently from an uninterrupted run")
    torch.set_num_threads(saved["threads"])
    return f"{saved['threads']} CPU thread(s), as in the checkpoint's run (this machine's choice now: {now}, {CHOICE})"


def quiet_interrupt(kind, value, traceback) -> None:
    """sys.excepthook: an uncaught Ctrl-C (while the libraries load) ends with one line; anything else as usual.
    Python still exits with the status of SIGINT (130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("\nInterrupted (Ctrl-C)", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


USER_THREADS = "OMP_NUM_THREADS" in os.environ  # the user's own count, before apply() may set one
sys.excepthook = quiet_interrupt
CHOICE = ""
apply()
