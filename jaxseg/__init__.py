"""jaxseg: unsupervised semantic segmentation without training, in JAX.

Submodules: models (DINO/DINOv2/DINOv3 ViTs), cluster (k-means), crf (dense CRF),
framework (the multilevel method), metrics, data (TFDS builders, I/O), viz.
"""

__version__ = "0.1.0"
