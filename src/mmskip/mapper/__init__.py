"""mmskip pipeline stage: mapper."""
