"""Ascend 310P/310B exporter (docs/ascend.md).

A static-shape fp16 standard-op ONNX decoder, ATC scripts, op lint and a KV-buffer runner
shipped in the package.
"""
