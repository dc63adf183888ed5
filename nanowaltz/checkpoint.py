"""Checkpoints and exact resume: a stop at any moment loses at most the iteration in progress and never forges state.

A training run may stop at any instant: Ctrl-C (SIGINT), a scheduler's SIGTERM, kill -9, a crash, a full disk.
What train.py promises, and how:

- A checkpoint holds the state between two iterations, never a state inside one: adapters, optimizer moments, the
  iteration count and the random-number states. Resuming from it and running on gives, bit for bit, the adapters and
  log rows an uninterrupted run would have given (`python train.py ... --resume`).
- Ctrl-C or SIGTERM (`StopSignals`): while nothing has changed yet (rollout, judge, rewards), the iteration in
  progress is abandoned and the checkpoint is written with the random states captured when the last iteration
  ended, so the abandoned iteration leaves no trace. Once the update has begun, the request waits: the iteration
  (update, log row, periodic checkpoint) completes, is checkpointed, and the run stops. A second Ctrl-C then stops
  at once without writing (the last checkpoint stays valid).
- A checkpoint folder is replaced atomically (`save_checkpoint`): the new one is written beside it as `<name>.tmp`,
  marked complete by its trainer_state.pt arriving last (a rename), and swapped in through `<name>.old`. At every
  instant one complete copy exists, and `find_checkpoint` repairs a swap cut half-way.
- On resume the log is cut back to the checkpoint's iteration (`trim_log`), so rows written after the last
  checkpoint (kill -9) are not repeated; a run into a folder that already holds a run needs --resume or --overwrite
  (`prepare_out`); settings that a resume cannot honour are refused and the others are reported (`check_resume_args`).
"""
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

from nanowaltz import distributed

from nanowaltz.cli import flag
from nanowaltz.models import save_agents

STATE_FILE = "trainer_state.pt"  # written last: its presence marks a checkpoint folder as complete
RUN_FILES = ("log.jsonl", "args.json", "checkpoint", "checkpoint.tmp", "checkpoint.old", "adapters", "warmstart")


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


def stop_and_save(stop, model, optimizers, completed, boundary, saved, args, checkpoint) -> int:
    """After Ctrl-C / SIGTERM: checkpoint the last completed iteration unless the stop cut an update; the exit code."""
    if stop.held:  # a second signal inside an update: the adapters may be half-updated, so nothing is written
        where = f"the last checkpoint (iteration {saved})" if saved is not None else "no checkpoint: none was written"
        print(f"\nStopped inside an update: nothing saved; --resume continues from {where}")
        return stop.exit_code
    stop.hold()
    try:
        if saved != completed:
            save_checkpoint(model, optimizers, completed, args, boundary, checkpoint)
    except KeyboardInterrupt:  # the save was cut, which a checkpoint survives (find_checkpoint)
        print(f"\nStopped while saving; --resume continues from the last complete checkpoint in {checkpoint}")
        return stop.exit_code
    print(f"\nStopped ({stop.requested or 'interrupted'}): the checkpoint in {checkpoint} holds the {completed} "
          f"completed iteration(s); continue with --resume")
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
    """Delete a checkpoint folder, its completeness mark first: a half-deleted folder never passes for a whole one."""
    (folder / STATE_FILE).unlink(missing_ok=True)
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
    swap_in(tmp, folder)


def find_checkpoint(folder) -> Path | None:
    """The complete checkpoint at `folder`, after repairing whatever an interrupted save_checkpoint left: a complete
    `.tmp` is the newest state (the swap had not finished), `.old` serves if the swap stopped between its two
    renames. Returns None when there is no complete checkpoint."""
    folder = Path(folder)
    tmp, old = sibling(folder, ".tmp"), sibling(folder, ".old")
    if (tmp / STATE_FILE).exists():
        swap_in(tmp, folder)
    elif not (folder / STATE_FILE).exists() and (old / STATE_FILE).exists():
        remove_checkpoint(folder)
        old.rename(folder)
    remove_checkpoint(tmp)
    remove_checkpoint(old)
    return folder if (folder / STATE_FILE).exists() else None


def read_checkpoint_state(folder) -> dict:
    """trainer_state.pt of a checkpoint; an unreadable file is a one-line error that names it."""
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, weights_only=False)
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
