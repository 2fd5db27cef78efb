"""effformer.train."""
