"""DINO and DINOv2 Vision Transformers in Flax, with checkpoint conversion."""
