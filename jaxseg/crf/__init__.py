"""Fully connected CRF with a permutohedral lattice, in pure JAX."""

from jaxseg.crf.inference import dense_crf, gaussian_lattice
from jaxseg.crf.lattice import Lattice, build_lattice, lattice_filter

__all__ = ["dense_crf", "gaussian_lattice", "Lattice", "build_lattice", "lattice_filter"]
