"""effformer.kernels."""
