"""Names of the compression methods and training variants, without importing torch.

The Snakefile reads these to build its wildcards; a light module keeps every `snakemake`
invocation (and every SLURM job, which parses the Snakefile again) from loading torch.
"""

METHODS = ("magnitude", "wanda", "random")  # pruning scores (mmskip.compression.pruning)
SUBNET = "subnet"  # evaluated like a method: the shared masks of every rule
# mappers of the training-with-compression stage (mmskip.compression.train); "dense" is the control:
# the same training with no compression
TRAIN_VARIANTS = ("dense", "pruned", "skipped", "small")
