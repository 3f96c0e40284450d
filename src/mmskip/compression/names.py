"""Names of the pruning methods, mask sets, calibrations, α-SubNet rules and training variants, without
importing torch.

The Snakefile reads these to build its wildcards, and :mod:`mmskip.params` to check params.yaml;
a light module keeps every `snakemake` invocation (and every SLURM job, which parses the
Snakefile again) from loading torch.
"""

METHODS = ("magnitude", "wanda", "random")  # pruning scores (mmskip.compression.pruning)
SUBNET = "subnet"  # the α-SubNet: one mask per rule, shared by the tasks (mmskip.compression.subnet)
# the mask sets evaluated (compression.mask_sets, models/masks/{name}): each pruning method's and the α-SubNet's
MASK_SETS = (*METHODS, SUBNET)
# Wanda's calibration inputs (mmskip.compression.calibration): the prompt (soft + text), the prompt
# with the answer, the text alone, or the soft prompt and BOS alone (the paper code's only_prompt)
CALIBRATIONS = ("prompt", "prompt_answer", "text", "only_prompt")
# how the α-SubNet combines the tasks' masks (mmskip.compression.subnet)
RULES = ("intersection", "union", "majority")
# mappers of the training-with-compression stage (mmskip.compression.train); "dense" is the control:
# the same training with no compression
TRAIN_VARIANTS = ("dense", "pruned", "skipped", "small")
