"""LayerLens: find and remove redundant layers in transformer language models."""

__version__ = "0.1.0"
