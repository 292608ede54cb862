"""DEQ-Transformer language model (in progress)."""
