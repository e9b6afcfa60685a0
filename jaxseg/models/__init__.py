"""DINO, DINOv2 and DINOv3 Vision Transformers in JAX (`encode`) and as a Flax linen module (`ViT`), with checkpoint conversion."""

from jaxseg.models.checkpoint import RefusedPickleError, read_state_dict, save_params
from jaxseg.models.config import VARIANTS, ViTConfig, get_variant
from jaxseg.models.convert import CheckpointError, hf_to_params, meta_to_params
from jaxseg.models.pos_embed import interpolate_pos_embed
from jaxseg.models.pretrained import WeightsUnavailableError, convert_file, load_params, load_pretrained, weights_url
from jaxseg.models.pretrained import weights_urls
from jaxseg.models.vit import ViT, ViTOutput, encode, init_params
