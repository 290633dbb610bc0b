"""Where work runs on this machine: the CPUs this process may use, the device, torch's thread count."""
from __future__ import annotations

import contextlib
import os

import torch

from tallzip.errors import TallzipError


def available_cpus() -> int:
    """The CPUs this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_device(device=None) -> torch.device:
    """'auto' (a CUDA device when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TallzipError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TallzipError("--device cuda asked for, but no CUDA device is available "
                               "(no GPU, or a PyTorch built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TallzipError(f"no CUDA device {device.index}: this machine has {torch.cuda.device_count()}")
    elif device.type != "cpu":
        raise TallzipError(f"device {str(device)!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    return device


@contextlib.contextmanager
def single_torch_thread(device: torch.device):
    """One PyTorch thread per chunk job on a CPU (the jobs themselves fill the cores); beside a GPU
    the CPU only feeds it. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else max(1, available_cpus() - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)
