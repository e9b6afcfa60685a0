"""Palettes, overlays and galleries."""
