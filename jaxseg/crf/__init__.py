"""Fully connected CRF with a permutohedral lattice, in pure JAX."""

from jaxseg.crf.inference import dense_crf
from jaxseg.crf.lattice import Lattice, build_lattice, lattice_filter

__all__ = ["dense_crf", "Lattice", "build_lattice", "lattice_filter"]
