"""Generative Cellular Automata."""

__version__ = "0.1.0"
