"""Dovetail training: distil a DGF draft from a target's features."""
