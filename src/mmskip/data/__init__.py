"""mmskip pipeline stage: data."""
