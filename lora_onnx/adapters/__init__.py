"""Adapters from outside: PEFT folders, adapter files (.onnx_adapter, .safetensors, .npz) and their checks."""
