"""mmskip: skipping computations in multimodal LLMs, as a reproducible pipeline."""

__version__ = "0.1.0"
