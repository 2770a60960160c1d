"""Reward and preference models used as judges and metrics."""
