"""The graph that ships with an exported model: the fp32 ONNX export checked against PyTorch,
or the int8 graph an int8 policy quantizes (its own room: it uses both `deploy` and `quantize`)."""
from __future__ import annotations

from torch import nn

from mtl_models.deployment.deploy import check_parity, export_onnx, max_abs_diff
from mtl_models.deployment.quantize import quantize, quantizes
from mtl_models.suites.reading import first_rows

PARITY_ROWS = 512  # validation inputs the exported graph is checked on


def shipped_graph(model: nn.Module, suite, quantization, *, threads: int = 1) -> tuple[bytes, dict]:
    """(the ONNX graph that ships, parity facts): the fp32 export, checked against PyTorch on
    the first PARITY_ROWS validation inputs (a PrunefuseError beyond tolerance), or for an int8
    policy its quantized graph, with how far int8 moved the outputs (for information)."""
    x, _ = first_rows(suite.val, PARITY_ROWS)
    fp32 = export_onnx(model, suite.example_inputs(2))
    facts = {"onnx_max_abs_diff": check_parity(model, fp32, x), "onnx_parity_rows": len(x)}
    if not quantizes(quantization):
        return fp32, facts
    int8 = quantize(model, suite, quantization, threads=threads).onnx_model
    facts["int8_max_abs_diff"] = max_abs_diff(model, int8, x)[0]
    return int8, facts
