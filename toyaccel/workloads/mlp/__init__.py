"""The book's Appendix A workload: the NeuralNetwork classifier on tabular data (workload.py: MLPWorkload)."""
