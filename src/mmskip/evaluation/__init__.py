"""mmskip pipeline stage: evaluation.

``BASELINE`` names the baseline everywhere: the dense LLM with the trained mapper, nothing skipped or
pruned. It is the key of the baseline's point in every family's metrics.json (``points[0]``, taken
from the one decode of ``mmskip baseline``), the stage and folder of that decode
(``results/baseline/{task}``) and the family of the plain Hugging Face evaluation's ``multimodal``
rows in summary.csv.

``INPUTS`` are the inputs of that plain evaluation (``mmskip evaluate --input``,
``results/eval/{task}/{input}``): ``multimodal`` (the cached perceptual tokens through the mapper)
or ``blind`` (the mapper's perceptual input zeroed: what the LLM answers from the text alone).
Kept here, torch-free, for the command line and the stage table.
"""

BASELINE = "baseline"
MULTIMODAL, BLIND = "multimodal", "blind"
INPUTS = (MULTIMODAL, BLIND)
