"""Frozen-encoder evaluation: features, linear probes, kNN and the evaluation datasets."""
