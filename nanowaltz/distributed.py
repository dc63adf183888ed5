"""Data-parallel training on N GPUs (or N CPU processes) with torch.distributed, launched by torchrun.

    torchrun --standalone --nproc-per-node N train.py ...

starts N copies of train.py ("ranks"), each with the whole model (base + both adapters) on its own GPU. One iteration
then splits only the work that grows with the batch, and keeps every number the one-process run would compute:

    prompt draw      every rank draws the same prompts with the shared RNG (same seed), then takes its slice (share)
    rollout, judge   each rank rolls out and judges its slice; afterwards all ranks exchange trajectories (gather),
                     so rewards, samples, advantage normalisation and the group baseline are over the GLOBAL batch
    scoring          each rank computes reference log-probs for its slice of an agent's samples; they are exchanged
    update           the minibatches are cut from the global sample list exactly as in one process; each rank
                     runs forward/backward on its slice of a minibatch, then the gradients are summed over ranks
                     (one all-reduce per optimizer step), so every rank takes the same optimizer step and the adapters
                     stay identical without ever being re-synchronised
    output           rank 0 alone writes the log, checkpoints and adapters and prints progress

Token-mean losses: one process divides a minibatch's loss by the minibatch's token count. Every rank knows the whole
minibatch (the sample list is global), so each rank divides its slice's loss by the GLOBAL token count; the SUM of
the ranks' gradients is then exactly the one-process gradient. (Averaging per-rank token-means instead would weigh
the tokens of a rank whose slice happens to be short more than the others.)

Why an explicit all-reduce and not DistributedDataParallel: DDP wraps one module and fixes its trainable parameters
when it is built, but our PeftModel switches which adapter is trainable (set_adapter), runs reference forwards with
the adapters off, and accumulates gradients over micro-batches (DDP would need find_unused_parameters and no_sync).
Summing the active agent's LoRA gradients once per optimizer step is what DDP does underneath, minus overlapping the
communication with backward, which matters little here: the rollout, not the update, dominates an iteration.

Failures: a rank that raises during its rollout or judging tells the others at the next sync point, and every rank
stops with a message naming the failed rank (stop_all_on_error). Anything else that makes a rank stop or hang is
bounded by --dist-timeout: a rank that waits longer than that at a sync point stops with a message saying so, and
torchrun then stops the rest.

Every helper is a no-op (or the identity) in a plain `python train.py` run, so the single-process path is unchanged.
"""
import os
import random
from contextlib import contextmanager
from datetime import timedelta
from functools import partialmethod

import torch
import torch.distributed as dist
import tqdm

# Startup (imports, model loading) can take minutes and ranks get there at different speeds; --dist-timeout, the
# bound on every later wait, takes over after the first sync (broadcast_adapters).
STARTUP_TIMEOUT_S = 1800
_timeout_s = None


def init(timeout_s: float) -> None:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE); otherwise do nothing."""
    global _timeout_s
    if "WORLD_SIZE" not in os.environ:
        return
    _timeout_s = timeout_s  # (a second train() in the same processes may change it; it applies from the broadcast)
    if dist.is_initialized():
        return
    if torch.cuda.is_available():  # one GPU per rank: "cuda" now means cuda:LOCAL_RANK everywhere (load_base)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
    if rank() != 0:  # one set of progress bars (rank 0's), not N interleaved ones. TQDM_DISABLE=1 would do this,
        # but tqdm reads it when first imported, long before this point; this is the same override, applied now.
        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one rank that writes files and prints (True in a plain single-process run)."""
    return rank() == 0


def finish() -> None:
    if active():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Splitting work, exchanging results
# ---------------------------------------------------------------------------------------------------------------------
def rank_slice(items: list) -> list:
    """This rank's contiguous slice of `items` (sizes differ by at most one); the whole list in one process."""
    n, r, w = len(items), rank(), world_size()
    return items[r * n // w:(r + 1) * n // w]


@contextmanager
def _sync_point(where: str):
    """Turn a failed or timed-out collective into a one-line message instead of a backend traceback."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError and friends: a peer closed its connection, or the wait timed out
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"rank {rank()}: lost the other ranks at {where} (no answer within --dist-timeout "
                         f"{_timeout_s:g} s, or one of them stopped; see its message): {detail}") from None


def _all_gather_object(obj, where: str) -> list:
    gathered = [None] * world_size()
    with _sync_point(where):
        dist.all_gather_object(gathered, obj)
    return gathered


def gather(local: list, where: str = "the trajectory exchange") -> list:
    """The concatenation, in rank order, of every rank's `local` list: the inverse of rank_slice()."""
    if not active():
        return local
    return [item for part in _all_gather_object(local, where) for item in part]


def exchange_scores(samples: list) -> None:
    """After each rank scored rank_slice(samples): give every rank the old/reference log-probs of all samples."""
    if not active():
        return
    mine = [(s.old_logprobs.cpu(), s.ref_logprobs.cpu()) for s in rank_slice(samples)]  # CPU: unpickles on any rank
    for s, (old, ref) in zip(samples, gather(mine, "the log-prob exchange")):
        s.old_logprobs, s.ref_logprobs = old, ref


def seed_sampling(seed: int, iteration: int) -> None:
    """Give each rank its own sampling noise for this iteration (the same stream would be repeated on every rank).

    Derived from (seed, iteration, rank), not carried along, so --resume continues exactly without per-rank state."""
    if active():
        torch.manual_seed(random.Random(f"{seed}-{iteration}-{rank()}").getrandbits(63))


# ---------------------------------------------------------------------------------------------------------------------
# Keeping the adapters identical
# ---------------------------------------------------------------------------------------------------------------------
def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_adapters(model) -> None:
    """Copy rank 0's LoRA weights to every rank: one starting point (fresh, resumed or warm-started) for all."""
    if not active():
        return
    with _sync_point("the start (adapter broadcast)"):
        for name, param in model.named_parameters():
            if "lora_" in name:
                dist.broadcast(param.data, src=0)
    # From here on every wait is bounded by --dist-timeout, not by the generous startup timeout.
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=_timeout_s))


def barrier(where: str) -> None:
    if active():
        with _sync_point(where):
            dist.barrier()


def all_reduce_gradients(params: list, finite: bool, loss: float) -> tuple:
    """Sum one minibatch's gradients (and its loss) over ranks; returns (finite on every rank, summed loss).

    Each rank's loss was divided by the minibatch's global token count, so the sum is the one-process gradient. A
    rank without gradients (its slice was empty) adds zeros; a rank with a non-finite loss makes every rank skip."""
    if not active():
        return finite, loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = torch.tensor([float(not finite), loss], device=_device())
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags])
    with _sync_point("the gradient all-reduce"):
        dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[-2].item() == 0, flat[-1].item()


def sum_over_ranks(totals: dict, keys) -> None:
    """In place: totals[k] summed over ranks, for statistics each rank accumulated over its own slice."""
    if not active():
        return
    values = torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=_device())
    with _sync_point("the statistics all-reduce"):
        dist.all_reduce(values)
    for k, v in zip(keys, values.tolist()):
        totals[k] = type(totals[k])(v)


# ---------------------------------------------------------------------------------------------------------------------
# One failing rank stops every rank
# ---------------------------------------------------------------------------------------------------------------------
@contextmanager
def stop_all_on_error(step: str):
    """Run a block of this rank's own work (no collectives inside), then check in with the other ranks.

    If the block raised on any rank, every rank stops: the failed rank re-raises its own error (as one process
    would), the others exit with a message naming it. Without this the others would wait at the next sync point."""
    if not active():
        yield
        return
    failure = None
    try:
        yield
    except (Exception, SystemExit) as err:
        failure = err
    message = None
    if failure is not None:
        message = str(failure.code) if isinstance(failure, SystemExit) else f"{type(failure).__name__}: {failure}"
    failed = [(r, m) for r, m in enumerate(_all_gather_object(message, f"the check after {step}")) if m is not None]
    if failure is not None:
        raise failure
    if failed:
        r, m = failed[0]
        raise SystemExit(f"rank {rank()}: stopping, rank {r} failed during {step}: {m}")
