"""Peak memory of one training step, shared by the step benchmarks (bench_train_step, bench_images).

CUDA: ``max_memory_allocated`` above what was live before the step. CPU: the running sum of
torch.profiler's ``profile_memory`` alloc/free records during the step (torch's own allocations,
not process RSS).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_memory(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch while ``step()`` runs, above the memory live before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    if not records:
        raise RuntimeError("torch.profiler recorded no CPU memory events; cannot measure the peak")
    records.sort(key=lambda e: e.start_ns())
    return max(0, max(itertools.accumulate(e.nbytes() for e in records)))
