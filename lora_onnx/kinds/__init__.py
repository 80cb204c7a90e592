"""Op kinds: what each kind of node (MatMul, Gemm, Conv, ...) needs to take, fold and export a LoRA branch."""
