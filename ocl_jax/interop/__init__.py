"""Weights to and from PyTorch / torchvision and the released checkpoints."""
