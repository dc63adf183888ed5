"""Checkpoints and exact resume: a stop at any moment loses at most the iteration in progress and never forges state.

A training run may stop at any instant: Ctrl-C (SIGINT), a scheduler's SIGTERM, kill -9, a crash, a full disk.
What train.py promises, and how:

- A checkpoint holds the state between two iterations, never a state inside one: adapters, optimizer moments, the
  iteration count, the random-number states, and what the numbers depend on (cpu_threads.numerics_record: the
  thread count that resume reuses, and what it reports when it differs). Resuming from it and running on gives, bit for bit, the adapters and
  log rows an uninterrupted run would have given (`python train.py ... --resume`).
- Ctrl-C or SIGTERM (`StopSignals`): while nothing has changed yet (rollout, judge, rewards), the iteration in
  progress is abandoned and the checkpoint is written with the random states captured when the last iteration
  ended, so the abandoned iteration leaves no trace. Once the update has begun, the request waits: the iteration
  (update, log row, periodic checkpoint) completes, is checkpointed, and the run stops. A second Ctrl-C then stops
  at once without writing (the last checkpoint stays valid).
- A checkpoint folder is replaced atomically (`save_checkpoint`): the new one is written beside it as `<name>.tmp`,
  marked complete by its trainer_state.pt arriving last (a rename), and swapped in through `<name>.old`. At every
  instant one complete copy exists, and `find_checkpoint` repairs a swap cut half-way.
- A checkpoint also holds the log rows up to its iteration: on resume the log is rewritten from them
  (`restore_log`), so rows written after the last checkpoint (kill -9) are not repeated, and a damaged or deleted
  log is restored and said so. A run into a folder that already holds a run needs --resume or --overwrite
  (`prepare_out`); settings that a resume cannot honour are refused and the others are reported (`check_resume_args`).
- Outputs that a reader may use while a run writes them (out/adapters, out/warmstart) are swapped in whole like a
  checkpoint (`save_agents_whole`), and an output folder is locked while a run or an evaluation writes to it
  (`lock_out`): a second one stops at once and says who holds it.
- A write that fails (a full disk) removes its half-written copy and stops with one line naming the path and the
  free space; the previous copy is untouched.
"""
import atexit
import errno
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from nanowaltz import distributed

from nanowaltz.cli import flag
from nanowaltz.models import MANIFEST, check_adapters, save_agents

try:
    import fcntl
except ImportError:  # not a POSIX system: output folders are not locked
    fcntl = None

STATE_FILE = "trainer_state.pt"  # written last: its presence marks a checkpoint folder as complete
WHOLE_FOLDERS = ("checkpoint", "adapters", "warmstart")  # each replaced whole, through <name>.tmp and <name>.old
RUN_FILES = ("log.jsonl", "log.jsonl.tmp", "args.json") + tuple(
    name + suffix for name in WHOLE_FOLDERS for suffix in ("", ".tmp", ".old"))
LOCK_FILE = ".lock"  # in a locked output folder: who holds it


# ----------------------------------------------------------------------------------------------- stop requests
class StopSignals:
    """Turn SIGINT and SIGTERM into a clean stop. Normally a signal raises KeyboardInterrupt at once (the caller
    abandons the iteration in progress). Between hold() and release() (the update and what follows it, while the
    adapters change) the first signal is only recorded in `requested`, for the caller to stop at the iteration's end;
    a second one raises KeyboardInterrupt, and `held` still True then tells the caller that the state may be
    half-updated and must not be saved. Handlers are installed only from the main thread; restore() puts the old
    ones back."""

    def __init__(self):
        self.requested, self.held, self.previous = None, False, {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False

    def _handle(self, signum, frame):
        first = self.requested is None
        self.requested = self.requested or signal.Signals(signum).name
        if self.held and first:
            print(f"\n{self.requested}: finishing the current iteration, then saving a checkpoint "
                  f"(Ctrl-C again stops at once, without saving)", file=sys.stderr)
            return
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.requested == "SIGTERM" else signal.SIGINT)


def save_on_stop(held: bool, completed: int, saved, checkpoint, save) -> str:
    """Checkpoint the last completed iteration (`save()`) unless the stop came inside an update (`held`), whose
    adapters may be half-updated; returns what the checkpoint now holds, as a sentence for the user."""
    if held:
        where = (f"the last checkpoint (iteration {saved})" if saved is not None else
                 "nothing: no checkpoint was written")
        return f"nothing saved (the stop came inside an update); --resume continues from {where}"
    if saved != completed:
        save()
    return f"the checkpoint in {checkpoint} holds the {completed} completed iteration(s); continue with --resume"


def stop_and_save(stop, completed: int, saved, checkpoint, save) -> int:
    """After Ctrl-C / SIGTERM: checkpoint the last completed iteration unless the stop cut an update; the exit code."""
    held = stop.held  # a second signal inside an update
    stop.hold()
    try:
        done = save_on_stop(held, completed, saved, checkpoint, save)
    except KeyboardInterrupt:  # the save was cut, which a checkpoint survives (find_checkpoint)
        print(f"\nStopped while saving; --resume continues from the last complete checkpoint in {checkpoint}")
        return stop.exit_code
    print(f"\nStopped ({stop.requested or 'interrupted'}): {done}")
    return stop.exit_code


def rng_state(rng) -> dict:
    """Every random state a training iteration draws from: Python's (prompt choice, shuffles), torch's (sampling)."""
    state = {"python_rng": rng.getstate(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(rng, state: dict) -> None:
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


# ----------------------------------------------------------------------------------------------- checkpoint folders
def sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint or adapters folder, its completeness marks first: a half-deleted folder never passes for a
    whole one."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def fsync(path: Path) -> None:
    """Push a file, or a folder's entries, to the disk, so that a power cut cannot reorder the writes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the rename order still holds for a process crash
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failure(err: Exception, path: Path, kept: str) -> str:
    """One line for a write that failed: the path, the reason (a full disk said as such), the free space, what is
    kept. A full disk reaches torch.save as an error of its zip writer that names neither."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = (err.strerror if isinstance(err, OSError) and err.strerror else
              (str(err).strip().splitlines() or [type(err).__name__])[0][:160])
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
        space = f"{free / 2 ** 20:.0f} MiB free on its disk"
        full = full or free < 2 ** 26
    except OSError:
        space = "free space unknown"
    return f"could not write {path} ({'the disk is full: ' if full else ''}{reason}; {space}): {kept}"


def write_whole(path, text: str) -> None:
    """Write a text file by a rename, so that a reader (or a crash) sees the old content or the new, never a part."""
    path = Path(path)
    part = sibling(path, ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def swap_in(new: Path, folder: Path) -> None:
    """Make the complete checkpoint `new` the one at `folder`, keeping the previous one as `folder.old` meanwhile."""
    old = sibling(folder, ".old")
    remove_checkpoint(old)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)  # from here `folder` is the new checkpoint; before it, `new` and `old` were both complete
    fsync(folder.parent)
    remove_checkpoint(old)


def save_checkpoint(model, optimizers, iteration, args, state, folder) -> None:
    """Write the state after `iteration` completed iterations to `folder`, atomically. `state` is rng_state() taken
    at that iteration boundary."""
    if not distributed.is_main():  # distributed: the ranks hold identical state; rank 0 writes it
        return
    folder = Path(folder)
    tmp = sibling(folder, ".tmp")
    try:
        remove_checkpoint(tmp)
        save_agents(model, tmp)
        part = tmp / (STATE_FILE + ".part")
        torch.save({"iteration": iteration, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "args": vars(args) if not isinstance(args, dict) else args, **state}, part)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync(path)
        os.replace(part, tmp / STATE_FILE)  # tmp is complete from this instant
        fsync(tmp)
    except (OSError, RuntimeError) as err:  # a full disk; the previous checkpoint has not been touched
        remove_checkpoint(tmp)
        kept = (f"the checkpoint in {folder} is unchanged" if (folder / STATE_FILE).exists() else
                "no checkpoint was written")
        raise SystemExit(write_failure(err, tmp, kept)) from None
    swap_in(tmp, folder)


def save_agents_whole(model, folder) -> None:
    """save_agents into `folder`, swapped in whole as a checkpoint is: a reader of `folder` (eval.py, infer.py) finds
    the previous pair or the new one, never half of each. The manifest, written last, marks the new copy complete."""
    folder = Path(folder)
    tmp = sibling(folder, ".tmp")
    try:
        remove_checkpoint(tmp)
        save_agents(model, tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync(path)
        fsync(tmp)
    except (OSError, RuntimeError) as err:
        remove_checkpoint(tmp)
        raise SystemExit(write_failure(err, tmp, f"{folder} is unchanged")) from None
    swap_in(tmp, folder)


def find_checkpoint(folder) -> Path | None:
    """The complete checkpoint at `folder`, after repairing whatever an interrupted save_checkpoint left: a complete
    `.tmp` is the newest state (the swap had not finished), `.old` serves if the swap stopped between its two
    renames. Returns None when there is no complete checkpoint."""
    folder = Path(folder)
    tmp, old = sibling(folder, ".tmp"), sibling(folder, ".old")
    if (tmp / STATE_FILE).exists() and intact(tmp, f"the checkpoint in {folder} is kept"):
        swap_in(tmp, folder)
    elif not (folder / STATE_FILE).exists() and (old / STATE_FILE).exists():
        remove_checkpoint(folder)
        old.rename(folder)
    remove_checkpoint(tmp)
    remove_checkpoint(old)
    return folder if (folder / STATE_FILE).exists() else None


def intact(folder: Path, kept: str) -> bool:
    """Whether a checkpoint folder that looks complete passes its adapters' checks (files readable, checksums equal
    to its manifest's); a warning names what failed and what is kept instead."""
    try:
        check_adapters(folder)
    except SystemExit as err:
        print(f"warning: {folder} is damaged ({err.code}): discarded; {kept}", file=sys.stderr)
        return False
    return True


def has_checkpoint(out: Path) -> bool:
    """Whether `out` holds a complete checkpoint, or the parts of a swap that find_checkpoint completes (no repair)."""
    return any((sibling(out / "checkpoint", suffix) / STATE_FILE).exists() for suffix in ("", ".tmp", ".old"))


def no_checkpoint(out: Path, checkpoint: Path) -> str:
    """What --resume says where there is no checkpoint, and what to do instead."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        return (f"--resume: no checkpoint at {checkpoint}: the run in {out} ({', '.join(found)}) stopped before its "
                f"first checkpoint, so there is nothing to resume; start it over with --overwrite")
    return f"--resume: no checkpoint at {checkpoint} (no run in {out})"


def read_checkpoint_state(folder) -> dict:
    """trainer_state.pt of a checkpoint; an unreadable file is a one-line error that names it."""
    path = Path(folder) / STATE_FILE
    try:
        # On the CPU, whatever device wrote it: a rank never touches another rank's GPU, and the optimizers'
        # load_state_dict moves each state tensor onto its parameter's device (the rank's own).
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["iteration"], state["optimizers"], state["python_rng"], state["torch_rng"]  # noqa: B018
    except Exception as err:  # truncated zip, not a torch file, an old format: all mean "cannot resume from it"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"--resume: {path} is unreadable or incomplete ({reason})") from None
    return state


def load_checkpoint(state: dict, optimizers, rng) -> int:
    """Restore optimizers and random states from read_checkpoint_state(); returns the completed iterations."""
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    set_rng_state(rng, state)
    return state["iteration"]


# ----------------------------------------------------------------------------------------------- output folder
def prepare_out(out: Path, resume: bool, overwrite: bool, remove: bool = False) -> None:
    """Refuse to start a new run over an earlier one unless --overwrite; with remove=True, delete that earlier run
    (only the files a run writes: other files in the folder stay)."""
    if resume:
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite and not has_checkpoint(out):
        raise SystemExit(f"--out {out} holds a run that stopped before its first checkpoint ({', '.join(found)}): "
                         f"there is nothing to resume; pass --overwrite to delete it and start over")
    if found and not overwrite:
        raise SystemExit(f"--out {out} already holds a run ({', '.join(found)}): continue it with --resume, or pass "
                         f"--overwrite to delete it and start over")
    if remove:
        for name in found:
            path = out / name
            if path.is_dir():
                remove_checkpoint(path)
            else:
                path.unlink(missing_ok=True)


def trim_log(log_path: Path, iteration: int) -> int:
    """Keep the log rows of iterations up to `iteration` (the checkpoint's); returns how many rows were dropped. A
    row cut short by a kill (not valid JSON) is dropped too."""
    if not log_path.exists():
        return 0
    kept, dropped = [], 0
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = sibling(log_path, ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log_path)
    return dropped


def restore_log(log_path: Path, rows: list, iteration: int) -> str | None:
    """Rewrite the log as the checkpoint's copy of its rows (those up to `iteration`); returns what differed, or None.
    Rows written after the checkpoint (a kill) are dropped; a damaged, edited or deleted log is restored."""
    want = [json.dumps(row) for row in rows]
    try:
        have = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        have = None
    if have == want:
        return None
    tmp = sibling(log_path, ".tmp")
    tmp.write_text("".join(line + "\n" for line in want))
    os.replace(tmp, log_path)
    if have is None:
        return (f"{log_path} was missing: its {len(want)} row(s) up to iteration {iteration} restored from the "
                f"checkpoint")
    if have[:len(want)] == want:
        return f"dropped {len(have) - len(want)} log row(s) written after the checkpoint's iteration {iteration}"
    line = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want))) + 1
    return (f"{log_path} line {line} differed from the checkpoint's copy of the log (damaged, edited or missing): its "
            f"{len(want)} row(s) up to iteration {iteration} restored from the checkpoint")


# ----------------------------------------------------------------------------------------------- locks
_HELD = {}  # output folders this process holds: resolved path -> (file descriptor, lock file, created the folder)


def lock_out(out, what: str) -> Path:
    """Lock the output folder `out` (created if need be) for this process, until release_out or the process ends; a
    folder that another process holds is a one-line error naming it (`what`, its pid and host, since when). The lock
    is the kernel's (flock), so a killed holder leaves no stale lock; taking it twice in one process is a no-op."""
    out = Path(out)
    key = out.resolve()
    if key in _HELD or fcntl is None:
        return out
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SystemExit(f"--out {out}: not a folder (a file has that name)") from None
    except OSError as err:
        raise SystemExit(f"--out {out}: cannot write there ({err.strerror or err})") from None
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise SystemExit(f"--out {out}: cannot write there ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SystemExit(f"--out {out} is in use by {holder}: wait for it to end, or choose another --out") \
                from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder deleted this file as it let go: lock the one now there
    os.ftruncate(fd, 0)
    os.write(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
    _HELD[key] = (fd, path, created)
    atexit.register(release_out, out)
    return out


def release_out(out) -> None:
    """Let go of lock_out's lock: the lock file goes, and the folder too if the lock created it and it is empty."""
    held = _HELD.pop(Path(out).resolve(), None)
    if held is None:
        return
    fd, path, created = held
    path.unlink(missing_ok=True)
    os.close(fd)
    if created:
        try:
            path.parent.rmdir()
        except OSError:  # not empty: the run wrote something
            pass


# Settings a resume cannot honour: the adapters' shape and base model, the random seed (the random states come from
# the checkpoint), and the warm-start, which has already run.
FIXED_ON_RESUME = ("model", "lora_rank", "lora_alpha", "seed", "warmstart_epochs", "warmstart_prompts", "warmstart_lr",
                   "warmstart_label_weight")
NOT_SETTINGS = ("resume", "overwrite", "out", "preset", "save_every")  # where and how often, not what is trained


def check_resume_args(saved: dict, args: dict, iteration: int) -> list:
    """Refuse a resume that would relabel or contradict the trained iterations; return the other changed settings
    as 'name old -> new' strings (the run continues with the new values, which an uninterrupted run would not)."""
    fixed = [k for k in FIXED_ON_RESUME if k in saved and k in args and saved[k] != args[k]]
    if fixed:
        raise SystemExit("--resume: the checkpoint was trained with "
                         + ", ".join(f"{flag(k)} {saved[k]}" for k in fixed)
                         + "; this run asks for " + ", ".join(f"{flag(k)} {args[k]}" for k in fixed)
                         + ". These cannot change on resume: keep them, or start a new run in another --out")
    total = args["stage1_iterations"] + args["stage2_iterations"]
    if total < iteration:
        raise SystemExit(f"--resume: the checkpoint is at iteration {iteration}, beyond the {total} iterations of "
                         f"--stage1-iterations {args['stage1_iterations']} + --stage2-iterations "
                         f"{args['stage2_iterations']}; a resumed run can only keep or extend the schedule")
    old_stage1 = saved.get("stage1_iterations", args["stage1_iterations"])
    if min(old_stage1, iteration) != min(args["stage1_iterations"], iteration):
        raise SystemExit(f"--resume: --stage1-iterations {old_stage1} -> {args['stage1_iterations']} would change the "
                         f"stage of iterations already trained (the checkpoint is at iteration {iteration})")
    return [f"{k} {saved[k]!r} -> {args[k]!r}" for k in args
            if k in saved and k not in NOT_SETTINGS and saved[k] != args[k]]
