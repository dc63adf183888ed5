"""OpenMP thread waiting on a CPU shared with other processes. Imported first by train.py, infer.py and eval.py.

PyTorch's CPU kernels run on an OpenMP thread team (GNU libgomp in the pip wheels). When a thread finishes its part
of a parallel region it waits for the next region: first it spins, then it sleeps. A decoding step is hundreds of
short kernels, so how long it spins decides two things:

- alone on the machine, spinning is fastest: the thread is awake when the next kernel starts. libgomp spins for
  ~300,000 iterations (a few ms) by default, and for minutes with OMP_WAIT_POLICY=ACTIVE;
- beside another busy process it is the slowest: a waiting thread spins on a core that a descheduled teammate needs,
  every region waits for its slowest thread, and runs get several times slower (the quickstart beside one light
  process: over 3x, with ~200k involuntary context switches). OMP_WAIT_POLICY=PASSIVE (never spin) removes that
  collapse, but every region then pays a wake-up: alone on the machine, `--preset cpu` iterations got ~1.5x slower.

Our default is in between: a bounded spin of GOMP_SPINCOUNT=10000 iterations (~0.1 ms at libgomp's own estimate of
100,000 spins per ms). That covers the gap between two kernels of one forward pass (tens of microseconds of Python),
so an idle machine keeps the speed of spinning, and a thread gives its core back after 0.1 ms, not a few ms, when
another process wants it. KMP_BLOCKTIME=1 (ms) is the same bound for Intel/LLVM OpenMP builds of torch.
Measured: pending. `python bench/threads.py` times a fixed decoding loop under these and the other settings, idle
and beside a busy process it starts itself (docs/performance.md has the table to fill in).

Rules: OpenMP reads these variables once, when torch is loaded, so this module must be imported before torch (each
entry point imports it first). It only fills in what you have not set: export OMP_WAIT_POLICY, GOMP_SPINCOUNT or
KMP_BLOCKTIME yourself and yours is used (with OMP_WAIT_POLICY set we add nothing, as GOMP_SPINCOUNT would override
the policy's own spin). The number of threads stays torch's default (one per core); OMP_NUM_THREADS sets it.
"""
import os

DEFAULTS = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}


def apply(environ=os.environ) -> dict:
    """Fill in DEFAULTS where neither they nor OMP_WAIT_POLICY are set; returns what was set."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    added = {name: value for name, value in DEFAULTS.items() if name not in environ}
    environ.update(added)
    return added


apply()
