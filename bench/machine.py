"""One line about where benchmark numbers come from; shared by the bench/ scripts."""
import os

import torch


def machine_info() -> str:
    """CPU model, cores, GPU if any, torch version and threads, current load average."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"machine: {cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average (1/5/15 min) {load}")
