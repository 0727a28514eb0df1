"""Compiled inference engines for dermbatch bundles: ONNX export, ONNX Runtime, TensorRT (``dermbatch build-engine``).

Imports the core (``dermbatch``); the core reaches this package only through its backend registry.
"""
