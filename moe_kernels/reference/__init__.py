"""Torch reference implementation of every stage (the golden), bit-faithful to spec §2."""
