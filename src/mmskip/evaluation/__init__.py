"""mmskip pipeline stage: evaluation.

``VARIANTS`` are the baseline evaluation's inputs: the image's cached tokens, or none (``blind``:
the mapper's visual input zeroed). Kept here, torch-free, for the command line and the stage table.
"""

VARIANTS = ("baseline", "blind")
