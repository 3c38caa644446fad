"""Inference apart from training: a trained text-to-image model and its samplers."""
