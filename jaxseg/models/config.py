"""ViT architecture configs: one frozen dataclass, and the released DINO / DINOv2 / DINOv3 variants."""

import dataclasses

POS_INTERP_MODES = ("meta", "hf", "hf_antialias")
POS_SCHEMES = ("learned", "rope")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3's satellite (SAT-493M) models are normalised with their own statistics (dinov3 README).
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static description of a DINO / DINOv2 / DINOv3 Vision Transformer (hashable: a jit static argument).

  Attributes:
    patch_size: side of a square patch in pixels.
    dim: token width D.
    depth: number of transformer blocks.
    num_heads: attention heads; head width is dim // num_heads.
    mlp: "mlp" (fc1, exact GELU, fc2) or "swiglu" (DINOv2 ViT-g; DINOv3 S+, H+ and 7B).
    layerscale: whether each residual branch is scaled per channel (DINOv2).
    num_registers: register tokens between CLS and the patches (0 or 4).
    pos_scheme: "learned" (DINO, DINOv2: a position embedding added to the tokens) or "rope" (DINOv3:
      axial rotary embedding of the patch tokens' q and k in every block, none on CLS or registers).
    pos_grid: side M of the pretraining position-embedding grid (M * M patch entries); "learned" only.
    pos_interp: how position embeddings are resized to an h x w patch grid (`interpolate_pos_embed`):
      "meta": bicubic with scale factors ((h + 0.1) / M, (w + 0.1) / M), as facebookresearch's
        DINO v1 (dino/vision_transformer.py) and DINOv2 without registers (dinov2 hubconf:
        interpolate_offset=0.1, interpolate_antialias=False). The default of the DINO and plain
        DINOv2 variants.
      "hf_antialias": antialiased bicubic to size (h, w), as facebookresearch's DINOv2 with
        registers (hubconf `*_reg`: interpolate_offset=0.0, interpolate_antialias=True) and
        transformers' Dinov2WithRegistersModel. The default of every `*_reg` variant.
      "hf": bicubic to size (h, w), no antialias: transformers' Dinov2Model and ViTModel, which
        differ from the official DINO / DINOv2 code by the missing 0.1 offset.
    layer_norm_eps: epsilon of every LayerNorm.
    mlp_ratio: MLP hidden width over dim, before the SwiGLU rounding.
    qkv_bias: whether the q/k/v projections carry a bias (DINOv3 7B has none).
    key_bias: whether that bias includes the key's; DINOv3 has none (Meta's bias_mask zeroes it), so
      its checkpoints hold q and v biases only.
    swiglu_align: the SwiGLU hidden width is rounded up to a multiple of this (64 for DINOv3 7B).
    rope_base: RoPE period base; head-dim quarter i has period rope_base ** (4 i / head_dim).
    mean, std: per-channel RGB statistics the input pixels (in [0, 1]) are normalised with.
  """
  patch_size: int
  dim: int
  depth: int
  num_heads: int
  mlp: str = "mlp"
  layerscale: bool = False
  num_registers: int = 0
  pos_grid: int = 37
  pos_interp: str = "meta"
  layer_norm_eps: float = 1e-6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  pos_scheme: str = "learned"
  key_bias: bool = True
  swiglu_align: int = 8
  rope_base: float = 100.0
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    # Tuples whatever the caller (or a JSON round trip) gave, so configs stay hashable and comparable.
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"ViTConfig.mean and std must be 3 values (std > 0), got {self.mean} and {self.std}.")
    if self.pos_scheme not in POS_SCHEMES:
      raise ValueError(f"ViTConfig.pos_scheme must be one of {POS_SCHEMES}, got {self.pos_scheme!r}.")
    if self.pos_scheme == "rope" and (self.dim // self.num_heads) % 4:
      raise ValueError(f"ViTConfig: rope needs a head width divisible by 4, got {self.dim} / {self.num_heads}.")
    if self.mlp not in ("mlp", "swiglu"):
      raise ValueError(f"ViTConfig.mlp must be 'mlp' or 'swiglu', got {self.mlp!r}.")
    if self.pos_interp not in POS_INTERP_MODES:
      raise ValueError(f"ViTConfig.pos_interp must be one of {POS_INTERP_MODES}, got {self.pos_interp!r}.")
    if self.dim % self.num_heads:
      raise ValueError(f"ViTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}.")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def mlp_hidden_dim(self) -> int:
    """Hidden width of the MLP; SwiGLU keeps 2/3 of it rounded up to a multiple of swiglu_align (as the references)."""
    hidden = int(self.dim * self.mlp_ratio)
    if self.mlp == "swiglu":
      align = self.swiglu_align
      hidden = (int(hidden * 2 / 3) + align - 1) // align * align
    return hidden


def _dino(patch_size: int, dim: int, heads: int) -> ViTConfig:
  # DINO v1 was pretrained at 224 pixels: a 14x14 grid for patch 16, 28x28 for patch 8.
  return ViTConfig(patch_size=patch_size, dim=dim, depth=12, num_heads=heads, pos_grid=224 // patch_size)


def _dinov2(dim: int, depth: int, heads: int, mlp: str = "mlp", registers: int = 0) -> ViTConfig:
  # DINOv2 checkpoints carry a 37x37 grid (518 pixels / patch 14); the register models were
  # released with an antialiased resize to the target size (hubconf *_reg), the others with the offset.
  return ViTConfig(patch_size=14, dim=dim, depth=depth, num_heads=heads, mlp=mlp, layerscale=True,
                   num_registers=registers, pos_grid=37, pos_interp="hf_antialias" if registers else "meta")


def _dinov3(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, mlp: str = "mlp", align: int = 8,
            qkv_bias: bool = True, sat: bool = False) -> ViTConfig:
  # facebookresearch/dinov3 hub/backbones.py: patch 16, 4 storage tokens, RoPE base 100, LayerNorm
  # eps 1e-5, layer scale, masked key bias.
  return ViTConfig(patch_size=16, dim=dim, depth=depth, num_heads=heads, mlp=mlp, layerscale=True,
                   num_registers=4, layer_norm_eps=1e-5, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                   pos_scheme="rope", key_bias=False, swiglu_align=align, rope_base=100.0,
                   mean=SAT493M_MEAN if sat else IMAGENET_MEAN, std=SAT493M_STD if sat else IMAGENET_STD)


VARIANTS: dict[str, ViTConfig] = {
    "dino_vits16": _dino(16, 384, 6),
    "dino_vits8": _dino(8, 384, 6),
    "dino_vitb16": _dino(16, 768, 12),
    "dino_vitb8": _dino(8, 768, 12),
    "dinov2_vits14": _dinov2(384, 12, 6),
    "dinov2_vitb14": _dinov2(768, 12, 12),
    "dinov2_vitl14": _dinov2(1024, 24, 16),
    "dinov2_vitg14": _dinov2(1536, 40, 24, mlp="swiglu"),
    "dinov2_vits14_reg": _dinov2(384, 12, 6, registers=4),
    "dinov2_vitb14_reg": _dinov2(768, 12, 12, registers=4),
    "dinov2_vitl14_reg": _dinov2(1024, 24, 16, registers=4),
    "dinov2_vitg14_reg": _dinov2(1536, 40, 24, mlp="swiglu", registers=4),
    "dinov3_vits16": _dinov3(384, 12, 6),
    "dinov3_vits16plus": _dinov3(384, 12, 6, mlp_ratio=6.0, mlp="swiglu"),
    "dinov3_vitb16": _dinov3(768, 12, 12),
    "dinov3_vitl16": _dinov3(1024, 24, 16),
    "dinov3_vith16plus": _dinov3(1280, 32, 20, mlp_ratio=6.0, mlp="swiglu"),
    "dinov3_vit7b16": _dinov3(4096, 40, 32, mlp_ratio=3.0, mlp="swiglu", align=64, qkv_bias=False),
    "dinov3_vitl16_sat": _dinov3(1024, 24, 16, sat=True),
    "dinov3_vit7b16_sat": _dinov3(4096, 40, 32, mlp_ratio=3.0, mlp="swiglu", align=64, qkv_bias=False, sat=True),
}


def get_variant(variant: str) -> ViTConfig:
  """VARIANTS[variant], with an error listing the known names."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; choose from {sorted(VARIANTS)}.")
  return VARIANTS[variant]
