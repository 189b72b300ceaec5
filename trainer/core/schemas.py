"""Constants every stage agrees on."""

# The label of a token that is not trained (no loss): PyTorch's cross-entropy ignore_index.
IGNORE_INDEX = -100

# The held-out generation prompts the templated eval split writes ({"row_id", "prompt", "reference"} per line).
HELD_OUT = "held_out.jsonl"

# Written last by the training process: a finished adapter (or full model) directory has it.
TRAINING_SUMMARY = "training_summary.json"

# Written into a merged model directory (what was merged, the end-of-turn text) before it is
# renamed into place: a merged directory has it.
MERGE_INFO = "sftdag_merge.json"

# Written last into a score's directory (`<store>/score/<key>/`): the held-out figures of a merged model.
SCORE = "score.json"
