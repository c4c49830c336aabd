"""edgeres: quantized residual networks to ONNX Runtime (CPU) and TensorRT (Jetson)."""

__version__ = "0.1.0"
