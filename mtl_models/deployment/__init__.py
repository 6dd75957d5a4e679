"""Making a model ready to ship: ONNX export and ONNX Runtime parity (`deploy`), int8
quantization (`quantize`), the graph an exported model ships (`ship`) and BatchNorm folding into the preceding conv / linear (`folding`).
"""
