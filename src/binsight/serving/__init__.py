"""Serving: the HTTP app over a counting service (decode, dynamic batching, admission by expected
wait), tokens and scopes, the pages, capture, metrics and a load tester.

Nothing here imports torch: a server process loads only ONNX Runtime or OpenVINO and NumPy.
"""
