"""The deployed model: ONNX export, ONNX Runtime sessions, parity, and latency where it runs.

A compressed model ships as ONNX (`export_onnx`): the inference form (BatchNorm folded, as
`measure.inference_form` builds it), one named output per task, a dynamic batch axis. It is
exported with torch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and
exports these small models in well under a second. `latency_ms(..., backend=...)` times a
model in torch eager or in ONNX Runtime; the dense base and every trial go through the same
call, so their ratio compares like with like. Imports torch and onnx / onnxruntime only.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings

import torch
from torch import nn

from spaces.errors import PrunefuseError, unknown_name
from spaces.vocabulary import LATENCY_BACKENDS

INPUT_NAME = "input"
OPSET = 17
# ONNX Runtime vs PyTorch, element-wise: |ort - torch| <= ATOL + RTOL * |torch|. fp32 kernels
# differ in summation order (and folded BatchNorm rounds once more): ~1e-6 on these models.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


class _TaskTuple(nn.Module):
    """The model with its dict output as a tuple in task order: ONNX outputs are positional."""

    def __init__(self, model: nn.Module, tasks: list[str]):
        super().__init__()
        self.model, self.tasks = model, list(tasks)

    def forward(self, x):
        out = self.model(x)
        return tuple(out[t] for t in self.tasks)


def task_names(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    with torch.no_grad(), _eval(model):
        return list(model(example_inputs[:1]))


@contextlib.contextmanager
def _eval(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def export_onnx(model: nn.Module, example_inputs: torch.Tensor) -> bytes:
    """The model's inference form as an ONNX graph (bytes): input `input` with a dynamic batch
    axis, one output per task named after it. The model itself is not changed."""
    from mtl_models.measuring.measure import inference_form

    x = example_inputs[:2].cpu()
    form = inference_form(model).cpu().to(memory_format=torch.contiguous_format)
    tasks = task_names(form, x)
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *tasks]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _no_attention_fastpath():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        torch.onnx.export(_TaskTuple(form, tasks), (x,), buffer, input_names=[INPUT_NAME], output_names=tasks,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


@contextlib.contextmanager
def _no_attention_fastpath():
    # Eval-mode nn.MultiheadAttention / TransformerEncoderLayer otherwise trace into fused
    # kernels (aten::_native_multi_head_attention) that have no ONNX symbolic.
    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def session(onnx_model: bytes, *, threads: int = 1, device: str = "cpu"):
    """An ONNX Runtime session: CPU execution provider with `threads` intra-op threads (the
    pinning trials use for torch), or the CUDA provider for a CUDA device."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PrunefuseError("this trial runs on CUDA, but the installed onnxruntime has no CUDA execution "
                                 "provider; install onnxruntime-gpu or use --latency-backend torch")
        providers = ["CUDAExecutionProvider", *providers]
    return ort.InferenceSession(onnx_model, options, providers=providers)


def run(sess, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{task: output} of one ONNX Runtime call on a batch."""
    outputs = sess.run(None, {INPUT_NAME: x.detach().cpu().numpy()})
    return {o.name: torch.from_numpy(v) for o, v in zip(sess.get_outputs(), outputs)}


class OnnxModel(nn.Module):
    """An ONNX graph behind the MTLModel call (`x -> {task: output}`), run by ONNX Runtime on
    the CPU, so `train.evaluate` scores it like any model. `onnx_model` holds the graph's bytes."""

    def __init__(self, onnx_model: bytes, *, threads: int = 1):
        super().__init__()
        self.onnx_model = onnx_model
        self.session = session(onnx_model, threads=threads)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return run(self.session, x)


def graph_bytes(onnx_model: bytes) -> int:
    """Bytes of the graph's weights as stored: every initializer at its own dtype (int8
    weights one byte each, their fp32 scales and int32 zero points and biases counted too)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_model).graph
    return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)


def max_abs_diff(model: nn.Module, onnx_model: bytes, inputs: torch.Tensor) -> tuple[float, bool]:
    """(largest |ONNX Runtime − PyTorch| over every task output, whether every element is
    within PARITY_ATOL + PARITY_RTOL × |PyTorch|) on `inputs`, both on the CPU."""
    import copy

    reference = copy.deepcopy(model).cpu()
    with torch.no_grad(), _eval(reference):
        want = reference(inputs.cpu())
    got = run(session(onnx_model), inputs)
    if set(got) != set(want):
        raise PrunefuseError(f"the ONNX graph's outputs {sorted(got)} are not the model's tasks {sorted(want)}")
    worst, within = 0.0, True
    for task, ref in want.items():
        diff = (got[task].to(ref.dtype) - ref).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        within = within and bool((diff <= PARITY_ATOL + PARITY_RTOL * ref.abs()).all())
    return worst, within


def check_parity(model: nn.Module, onnx_model: bytes, inputs: torch.Tensor) -> float:
    """The max absolute difference of `max_abs_diff`; a PrunefuseError when beyond tolerance."""
    worst, within = max_abs_diff(model, onnx_model, inputs)
    if not within:
        raise PrunefuseError(f"ONNX parity failed: ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} "
                             f"on {len(inputs)} validation inputs (tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g}×|output|)")
    return worst


def check_backend(backend: str) -> str:
    if backend not in LATENCY_BACKENDS:
        raise unknown_name("latency backend", backend, LATENCY_BACKENDS)
    return backend


def for_backend(model: nn.Module, example_inputs: torch.Tensor, backend: str) -> nn.Module:
    """What `backend` runs: the model itself for torch, its exported graph (an OnnxModel) for
    onnxruntime. Exporting takes a while; callers timing under a lock do it first."""
    if check_backend(backend) == "onnxruntime" and not isinstance(model, OnnxModel):
        return OnnxModel(export_onnx(model, example_inputs))
    return model


def latency_ms(model: nn.Module, example_inputs: torch.Tensor, *, backend: str = "torch", threads: int = 1,
               warmup: int = 5, runs: int = 30, device: str = "cpu") -> float:
    """Median ms of one forward pass of `example_inputs` where the model runs: `torch` (its
    inference form in eager PyTorch, `measure.latency_ms`) or `onnxruntime` (its exported
    graph, or an `OnnxModel`'s own graph, in an ONNX Runtime session)."""
    from mtl_models.measuring import measure

    check_backend(backend)
    if backend == "torch":
        if isinstance(model, OnnxModel):
            raise PrunefuseError("an ONNX Runtime graph (a quantized model) cannot be timed in torch eager; "
                                 "use --latency-backend onnxruntime")
        return measure.latency_ms(model, example_inputs, threads=threads, warmup=warmup, runs=runs, device=device)
    graph = model.onnx_model if isinstance(model, OnnxModel) else export_onnx(model, example_inputs)
    sess = session(graph, threads=threads, device=device)
    return median_ms(lambda x: sess.run(None, {INPUT_NAME: x}), example_inputs.cpu().numpy(),
                     warmup=warmup, runs=runs)


def median_ms(call, x, *, warmup: int, runs: int) -> float:
    """Median wall time of `call(x)` in ms over `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


PARITY_ROWS = 512  # validation inputs the exported graph is checked on


def shipped_graph(model: nn.Module, suite, quantization, *, threads: int = 1) -> tuple[bytes, dict]:
    """(the ONNX graph that ships, parity facts): the fp32 export, checked against PyTorch on
    the first PARITY_ROWS validation inputs (a PrunefuseError beyond tolerance), or for an int8
    policy its quantized graph, with how far int8 moved the outputs (for information)."""
    from mtl_models.deployment.quantize import quantize, quantizes

    from mtl_models.suites.reading import first_rows

    x, _ = first_rows(suite.val, PARITY_ROWS)
    fp32 = export_onnx(model, suite.example_inputs(2))
    facts = {"onnx_max_abs_diff": check_parity(model, fp32, x), "onnx_parity_rows": len(x)}
    if not quantizes(quantization):
        return fp32, facts
    int8 = quantize(model, suite, quantization, threads=threads).onnx_model
    facts["int8_max_abs_diff"] = max_abs_diff(model, int8, x)[0]
    return int8, facts
