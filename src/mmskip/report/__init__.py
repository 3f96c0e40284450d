"""mmskip pipeline stage: report."""
