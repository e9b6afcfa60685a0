"""Fully connected CRF with a permutohedral lattice, in pure JAX."""
