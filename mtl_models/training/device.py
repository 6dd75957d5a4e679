"""Where a job runs and in which precision it trains: the one home of both rules.

Every job that trains or measures (a trial, the dense base, an expert, a reference, the
dense measurement, `apply`) asks `job_device()`. Inside a Ray worker the answer comes from
the resources Ray gave that job: a job given a GPU (a whole one or a share, e.g. 0.5) runs on
CUDA, one given none runs on the CPU even where the machine has a GPU (it would take
another job's share). Outside Ray (apply, notebooks) a device is asked for by name.

Ray is looked up in `sys.modules`, never imported: a Ray worker has imported it already,
and `mtl_models` used on its own should not pay for importing it.
"""
from __future__ import annotations

import contextlib
import sys
import typing

import torch

from spaces.errors import PrunefuseError
from spaces.policy import Precision

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = typing.get_args(Precision)          # fp32 | bf16 | fp16
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_for(gpu_ids: list | None, *, cuda_available: bool, requested: str | None = None) -> str:
    """The rule, as a pure function. `gpu_ids`: the GPUs Ray gave this job (None outside a
    Ray worker); `requested`: "cpu", "cuda", "auto" (CUDA where there is one) or None (Ray's
    resources decide; outside Ray, the CPU)."""
    if requested not in (None, *DEVICES):
        raise PrunefuseError(f"device {requested!r} is not one of: {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not cuda_available:
            raise PrunefuseError("device 'cuda' was asked for, but torch here sees no CUDA GPU "
                                 "(a CPU build of torch, or CUDA_VISIBLE_DEVICES hides them); use --device cpu")
        return "cuda"
    if requested == "auto" and gpu_ids is None:
        return "cuda" if cuda_available else "cpu"
    if not gpu_ids:
        return "cpu"
    if not cuda_available:
        # Running on the CPU instead would time and train every trial on the wrong device, silently.
        raise PrunefuseError(f"Ray gave this job GPU(s) {list(gpu_ids)}, but torch on this node sees no CUDA "
                             f"(torch {torch.__version__}); install a CUDA build of torch there, "
                             f"or search with --gpus-per-trial 0")
    return "cuda"


def ray_gpu_ids() -> list | None:
    """The GPUs Ray gave the current job, or None when this process is not a Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        return list(ray.get_gpu_ids())
    except Exception:  # ray imported, but this is not a worker
        return None


def job_device(requested: str | None = None) -> str:
    """The device this job runs on: see the module docstring and `device_for`."""
    return device_for(ray_gpu_ids(), cuda_available=torch.cuda.is_available(), requested=requested)


def device_name(device: str) -> str:
    """What a latency figure was taken on: the GPU's model name on CUDA, else "cpu"."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


# --- precision ---

def check_precision(precision: str, device: str, *, what: str = "finetune.precision") -> None:
    """fp32 and bf16 train anywhere (torch autocasts to bf16 on the CPU too, correct though
    slower than fp32 where the CPU lacks bf16 instructions); fp16 needs CUDA, whose grad
    scaler keeps small fp16 gradients from flushing to zero."""
    if precision not in PRECISIONS:
        raise PrunefuseError(f"{what} {precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise PrunefuseError(f"{what} fp16 needs a CUDA GPU, and this job runs on the {device.upper()}; "
                             f"use fp32 or bf16 there (or --gpus-per-trial > 0)")


def autocast(precision: str, device: str):
    """The forward pass's autocast context for a training step (a no-op for fp32)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 training (disabled, a pass-through, otherwise)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def half_dtype(precision: str, device: str) -> torch.dtype | None:
    """The dtype latency is also timed in: the policy's half precision, on CUDA only (CPU
    kernels gain little from it, and fp16 on the CPU is refused for training anyway)."""
    if precision == "fp32" or not device.startswith("cuda"):
        return None
    return _DTYPES[precision]


# --- memory ---

def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_mb(device: str) -> float:
    """CUDA memory this process allocated at its peak since the last reset, in MiB (0 on the CPU)."""
    if not device.startswith("cuda"):
        return 0.0
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
