"""The book's Appendix A workload: the NeuralNetwork classifier on tabular data (workload.py: MLPWorkload).

Its constants live here, light to import: toyaccel.config declares the options with them (a downward import)."""

EVAL_TRAIN_SAMPLE = 8192  # rows of the fixed training-set sample that --eval-train sample scores
