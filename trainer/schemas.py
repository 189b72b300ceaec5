"""Constants every stage agrees on."""

# The label of a token that is not trained (no loss): PyTorch's cross-entropy ignore_index.
IGNORE_INDEX = -100
