"""effformer.data."""
