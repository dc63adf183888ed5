"""nanowaltz/cpu_threads.py: the OpenMP wait policy is chosen from the machine's load at start, only when the user
did not choose it, and reaches OpenMP before torch."""
import ast
import os
import subprocess
import sys

import pytest

from nanowaltz import cpu_threads
from conftest import PROJECT_ROOT


def test_an_idle_machine_keeps_the_spin_and_a_busy_one_gets_passive_threads_on_the_free_cores():
    idle = {"PATH": "/bin"}
    assert cpu_threads.apply(idle, busy_cores=0.05, cores=2) == {} and idle == {"PATH": "/bin"}
    assert cpu_threads.CHOICE.startswith("spin")
    busy = {"PATH": "/bin"}
    chosen = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}  # 2 cores, 1 taken: one thread
    assert cpu_threads.apply(busy, busy_cores=1.0, cores=2) == chosen
    assert busy == {"PATH": "/bin", **chosen} and "1.00 cores" in cpu_threads.CHOICE
    assert cpu_threads.apply(busy, busy_cores=0.0, cores=2) == {}  # a second import changes nothing: it is set now
    edge = {}
    assert cpu_threads.apply(edge, busy_cores=cpu_threads.BUSY_CORES, cores=2) == {"OMP_WAIT_POLICY": "PASSIVE",
                                                                                 "OMP_NUM_THREADS": "1"}
    # Hand-computed: the cores left entirely free (floor of cores - busy), at least 1.
    for cores, busy_cores, threads in ((8, 1.0, "7"), (8, 2.6, "5"), (8, 0.3, "7"), (2, 0.39, "1"), (2, 3.0, "1"),
                                       (1, 0.9, "1")):
        assert cpu_threads.apply({}, busy_cores=busy_cores, cores=cores)["OMP_NUM_THREADS"] == threads


def test_a_users_thread_count_is_kept_on_a_busy_machine():
    environ = {"OMP_NUM_THREADS": "4"}
    assert cpu_threads.apply(environ, busy_cores=1.0, cores=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}


def test_the_thread_count_reaches_torch_when_set_before_it_loads():
    # KMP_BLOCKTIME (ignored by libgomp) makes the import-time choice "yours", so only the explicit call decides.
    code = ("import os; from nanowaltz import cpu_threads; "
            "os.environ.update(cpu_threads.apply({}, busy_cores=1.0, cores=2)); "
            "import torch; print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env={**env, "KMP_BLOCKTIME": "0"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "1"


def test_unknown_load_sets_nothing(monkeypatch):
    assert cpu_threads.busy_cores_elsewhere(read=lambda: None, sleep=lambda s: None) is None
    monkeypatch.setattr(cpu_threads, "busy_cores_elsewhere", lambda: None)  # e.g. no /proc/stat
    environ = {}
    assert cpu_threads.apply(environ) == {} and environ == {} and "unknown" in cpu_threads.CHOICE


@pytest.mark.parametrize("variable", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"])
def test_a_users_openmp_setting_is_left_alone(variable):
    # In libgomp GOMP_SPINCOUNT overrides the policy's spin count, so with any of these set we add nothing.
    environ = {variable: "0"}
    assert cpu_threads.apply(environ, busy_cores=2.0) == {} and environ == {variable: "0"}


def test_busy_cores_from_two_readings_of_proc_stat(tmp_path):
    """Hand-computed: between the readings 400 jiffies passed on 4 CPUs, 150 of them busy -> 1.5 cores."""
    stats = iter([
        "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1\ncpu1 1\ncpu2 1\ncpu3 1\nintr 5\n",
        "cpu  200 0 100 1020 80 0 0 0 0 0\ncpu0 1\ncpu1 1\ncpu2 1\ncpu3 1\nintr 9\n",
    ])
    path = tmp_path / "stat"

    def read():
        path.write_text(next(stats))
        return cpu_threads.read_cpu_times(path)

    slept = []
    assert cpu_threads.busy_cores_elsewhere(read=read, sleep=slept.append) == pytest.approx(1.5)
    assert slept == [cpu_threads.WINDOW_S]
    assert cpu_threads.read_cpu_times(tmp_path / "missing") is None


def test_the_real_proc_stat_reads(tmp_path):
    reading = cpu_threads.read_cpu_times()
    if reading is None:
        pytest.skip("no /proc/stat on this system")
    busy, total, cpus = reading
    assert 0 <= busy <= total and cpus >= 1


@pytest.mark.parametrize("entry_point", ["train.py", "infer.py", "eval.py"])
def test_entry_points_import_it_before_anything_else(entry_point):
    """OpenMP reads its settings when torch is loaded: the first import of each entry point must be cpu_threads
    (any other project module may import torch)."""
    tree = ast.parse((PROJECT_ROOT / entry_point).read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    first = imports[0]
    assert isinstance(first, ast.ImportFrom) and first.module == "nanowaltz" and [a.name for a in first.names] == [
        "cpu_threads"]


def test_the_version_lock_pins_what_the_numerics_record_names_within_the_ranges_of_requirements():
    """requirements-lock.txt pins torch and every package whose version a run records, each inside the range
    requirements.txt allows (so `pip install -r requirements-lock.txt` after setup.sh never leaves the supported
    ranges), and every run's record names the same packages."""
    from packaging.requirements import Requirement

    def requirements(name):
        lines = (PROJECT_ROOT / name).read_text().splitlines()
        found = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
        return {r.name.lower(): r for r in found}

    lock, ranges = requirements("requirements-lock.txt"), requirements("requirements.txt")
    record = cpu_threads.numerics_record()
    for package in ("torch", *cpu_threads.LOCKED_PACKAGES):
        assert package in record
        pinned = lock[package].specifier
        assert len(pinned) == 1 and next(iter(pinned)).operator == "==", f"{package}: {pinned}"
        version = next(iter(pinned)).version
        if package in ranges:
            assert ranges[package].specifier.contains(version, prereleases=True), (package, version)
