"""DINO and DINOv2 Vision Transformers in Flax, with checkpoint conversion."""

from jaxseg.models.config import VARIANTS, ViTConfig, get_variant
from jaxseg.models.convert import CheckpointError, hf_to_params, meta_to_params
from jaxseg.models.pos_embed import interpolate_pos_embed
from jaxseg.models.vit import ViTOutput, encode, init_params
