"""What a compressed model costs and how well it does: size, MACs, latency, Δm.

Latency is always measured on the device the model runs on, never derived from
sparsity: unstructured zeros cost the same time as any other weight on dense kernels.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch


def stored_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero_params(model) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def storage_bytes(model) -> int:
    """Bytes to store the weights: dense, or as (value, int32 index) pairs where that is smaller."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        dense = t.numel() * t.element_size()
        sparse = int(torch.count_nonzero(t)) * (t.element_size() + 4)
        total += min(dense, sparse)
    return total


def count_macs(model, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at the example's batch size, per sample."""
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model, example_inputs[:1])
    return int(macs)


@contextlib.contextmanager
def pinned_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def latency_ms(model, example_inputs: torch.Tensor, *, threads: int = 1, warmup: int = 5,
               runs: int = 30, device: str = "cpu") -> float:
    """Median wall time of one forward pass in ms, after `warmup` untimed passes."""
    model = model.to(device).eval()
    x = example_inputs.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with pinned_threads(threads):
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def delta_m(metrics: dict[str, float], reference: dict[str, float], higher_is_better: dict[str, bool]) -> float:
    """Δm% = (1/T) Σ_t (−1)^{l_t} (M_t − M_t^ref) / M_t^ref × 100, l_t = 1 where lower is better.

    (Maninis et al. 2019; Vandenhende et al. 2021.) Positive is better than the reference.
    """
    terms = []
    for task, ref in reference.items():
        sign = 1.0 if higher_is_better[task] else -1.0
        terms.append(sign * (metrics[task] - ref) / max(abs(ref), 1e-12) * 100.0)
    return sum(terms) / len(terms)
