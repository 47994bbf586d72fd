"""Measurement: memory, timing, gradient flow, scaling fit, perplexity, causality."""
