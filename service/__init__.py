"""The bnfold inference service: Open Inference Protocol over FastAPI + onnxruntime (no torch)."""
