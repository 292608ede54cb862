"""Multiscale DEQ (in progress)."""
