"""Contrastive objectives (MoCo v2, BYOL, SimCLR): the losses and the method registry."""
