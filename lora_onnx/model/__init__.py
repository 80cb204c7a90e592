"""The model layer: load a graph without its weights, read tensors on demand, stream and save atomically."""
