"""Evaluation of encoders: linear probe, k-NN, reconstructions."""
