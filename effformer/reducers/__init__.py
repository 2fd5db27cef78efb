"""effformer.reducers."""
