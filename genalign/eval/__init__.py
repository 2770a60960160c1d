"""Evaluation: image, motion and text metrics."""
