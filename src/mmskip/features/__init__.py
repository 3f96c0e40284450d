"""mmskip pipeline stage: features."""
