"""Rendering of generated samples (skeleton animations and filmstrips of motions)."""
