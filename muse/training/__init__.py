"""Training and what it needs: corpora and tokenizers, the trainer, checkpoints, run folders,
multi-GPU ranks, evaluation, and the equal-budget perplexity gate built on them."""
