"""meshserve node: dials out to the control plane and serves ONNX models with onnxruntime."""
