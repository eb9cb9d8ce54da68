"""Backends: each exposes ``softmax_loss``, ``sigmoid_loss`` and ``available(device)``."""
