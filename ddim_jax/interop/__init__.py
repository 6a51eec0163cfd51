"""Interoperability: the weight-file format shared with the PyTorch twin, and the JAX-vs-torch parity tools."""
