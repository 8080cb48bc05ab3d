"""Runnable examples (``python -m resnext.examples.<name>``)."""
