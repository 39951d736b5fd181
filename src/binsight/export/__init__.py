"""The bridge from training to inference: a checkpoint becomes a verified ONNX file that carries
everything a runtime needs (input size, normalisation, classes, calibration, monitoring baseline)."""
