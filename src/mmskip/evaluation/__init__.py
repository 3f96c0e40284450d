"""mmskip pipeline stage: evaluation."""
