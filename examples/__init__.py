"""Worked examples for prunefuse (not installed with the package; run them from the repo root)."""
