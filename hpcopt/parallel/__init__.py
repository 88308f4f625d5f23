"""Parallel strategies: how gradients and parameters move between ranks."""
