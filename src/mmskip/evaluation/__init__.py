"""mmskip pipeline stage: evaluation.

``BASELINE`` names the baseline everywhere: the dense LLM with the trained mapper, nothing skipped or
pruned. It is the key of the baseline's point in every family's metrics.json (``points[0]``, taken
from the one decode of ``mmskip baseline``), the stage and folder of that decode
(``results/baseline/{task}``) and the first of ``VARIANTS``, the inputs of the plain Hugging Face
evaluation: the image's cached tokens, or none (``blind``: the mapper's visual input zeroed).
Kept here, torch-free, for the command line and the stage table.
"""

BASELINE = "baseline"
VARIANTS = (BASELINE, "blind")
