"""Making a model ready to ship: ONNX export and ONNX Runtime parity (`deploy`), int8
quantization (`quantize`) and BatchNorm folding into the preceding conv / linear (`folding`).
"""
