"""effformer.nn."""
