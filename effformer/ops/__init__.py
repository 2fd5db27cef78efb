"""effformer.ops."""
