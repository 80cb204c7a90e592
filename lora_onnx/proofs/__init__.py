"""Proofs in onnxruntime: inputs, tolerances, sessions and the comparison of every output."""
