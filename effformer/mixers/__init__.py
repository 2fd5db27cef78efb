"""effformer.mixers."""
