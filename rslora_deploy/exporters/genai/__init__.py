"""The onnxruntime-genai exporter: the model builder (child process) and the mixed-bits rewrite."""
