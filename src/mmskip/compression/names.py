"""Names of the compression methods and training variants, without importing torch.

The Snakefile reads these to build its wildcards; a light module keeps every `snakemake`
invocation (and every SLURM job, which parses the Snakefile again) from loading torch.
"""

METHODS = ("magnitude", "wanda", "random")  # pruning scores (mmskip.compression.pruning)
SUBNET = "subnet"  # evaluated like a method: the shared masks of every rule
TRAIN_VARIANTS = ("pruned", "skipped", "small")  # mappers trained with compression (mmskip.compression.train)
