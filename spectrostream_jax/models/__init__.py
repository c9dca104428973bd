"""Flax Linen modules of the codec and its discriminators."""
