"""Proof that the PyTorch and MindSpore backends give the same answers (`pytest parity_tests`)."""
