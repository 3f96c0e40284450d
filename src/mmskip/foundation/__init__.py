"""mmskip pipeline stage: foundation."""
