"""Serving: ONNX export, an ONNX Runtime counter, dynamic batching, the HTTP app and a load tester.

Nothing here imports torch except `export`: a server process loads only ONNX Runtime and NumPy.
"""
