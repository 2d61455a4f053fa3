"""Measuring edits: single-edit evaluation, the five metrics, the M-Loc same-object split, IM maps."""
