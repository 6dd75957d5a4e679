"""Post-training int8 quantization of a fine-tuned model: a policy's `quantization.method`.

Done by ONNX Runtime's quantization tools on the exported graph (`deploy.export_onnx`), and
run by ONNX Runtime: the int8 model measured is the `model.onnx` that ships. Chosen over
torch.ao by measured speed on these CPUs (AVX2, no VNNI; one thread): torch.ao's int8 MLP took
0.72 ms at batch 1 against ONNX Runtime's 0.115 ms (CNN: 1.51 vs 0.35 ms), and at batch 256
the two static int8 forms were level (benchmarks/deploy.py, README); torch.ao's quantized
modules also do not export to ONNX.

Methods (`METHODS`, names as in `spaces.policy.Quantization.method`):
- `dynamic_int8`: int8 weights, per output channel; activations quantized per batch at run time.
- `static_int8`: int8 weights per output channel, uint8 activations with ranges calibrated
  (min/max) on the first `calibration_samples` training rows; QDQ graph, which ONNX Runtime
  fuses into integer kernels.
Both are deterministic: the same model and policy give the same graph, byte for byte.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

from spaces.errors import unknown_name
from spaces.policy import Quantization

from mtl_models.deployment.deploy import INPUT_NAME, OnnxModel, export_onnx

CALIBRATION_BATCH = 64


def _dynamic(graph_in: str, graph_out: str, suite, spec: Quantization) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(graph_in, graph_out, weight_type=QuantType.QInt8, per_channel=True)


def _static(graph_in: str, graph_out: str, suite, spec: Quantization) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(graph_in, graph_out, _Calibration(suite.train, spec.calibration_samples),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)


METHODS = {"dynamic_int8": _dynamic, "static_int8": _static}


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over the first `rows` training rows, read
    in fixed batches as the quantizer asks for them (deterministic view: no augmentation)."""

    def __init__(self, split, rows: int):
        from mtl_models.suites.reading import in_order, read

        self._batches = read(split, in_order(split, batch_size=CALIBRATION_BATCH, rows=rows))

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[1].numpy()}


def quantizes(spec: Quantization) -> bool:
    return spec.method != "none"


def quantize(model, suite, spec: Quantization, *, threads: int = 1) -> OnnxModel:
    """The model's int8 ONNX graph, as a runnable OnnxModel (its `onnx_model` is what ships)."""
    if spec.method not in METHODS:
        raise unknown_name("quantization method", spec.method, ["none", *METHODS])
    fp32 = export_onnx(model, suite.example_inputs(2))
    with tempfile.TemporaryDirectory(prefix="prunefuse-quantize-") as folder, _quiet_quantizer():
        graph_in, graph_out = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
        with open(graph_in, "wb") as f:
            f.write(fp32)
        METHODS[spec.method](graph_in, graph_out, suite, spec)
        with open(graph_out, "rb") as f:
            return OnnxModel(f.read(), threads=threads)


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs a pre-processing hint on the root logger on every call."""
    root = logging.getLogger()

    def hint(record):
        return "pre-process" not in str(record.msg) and "pre-processing" not in str(record.msg)

    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
