"""Dovetail inference: load a target and a trained draft, decode speculatively, evaluate."""
