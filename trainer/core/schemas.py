"""Constants every stage agrees on."""

# The label of a token that is not trained (no loss): PyTorch's cross-entropy ignore_index.
IGNORE_INDEX = -100

# Written last by the training process: a finished adapter (or full model) directory has it.
TRAINING_SUMMARY = "training_summary.json"
