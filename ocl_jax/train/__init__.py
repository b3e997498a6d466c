"""Contrastive pretraining: the train state, the per-device step and the loop."""
