"""DINO / DINOv2 / DINOv3 Vision Transformer forward pass on plain parameter pytrees.

Parameters (see `init_params` for shapes) are a nested dict of arrays; block weights are
stacked along a leading depth axis so a checkpoint is a handful of arrays. The forward pass
computes exactly what the facebookresearch and transformers models compute: pre-norm blocks,
LayerNorm (eps from the config), exact-erf GELU or SwiGLU, optional layerscale, CLS then
registers then patches. Positions are either learned embeddings added before the registers are
inserted (DINO, DINOv2) or, for DINOv3, an axial rotary embedding (RoPE) applied to the patch
tokens' queries and keys in every block, never to CLS or the registers.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxseg.models.config import ViTConfig
from jaxseg.models.pos_embed import interpolate_pos_embed

Params = dict[str, Any]
ATTENTION_LOOPS = ("auto", "map", "vmap")


@flax.struct.dataclass
class ViTOutput:
  """What `encode` returns; a pytree, so it passes through jit and vmap.

  Attributes:
    cls: [B, D] CLS token after the final LayerNorm.
    patch_tokens: [B, h, w, D] patch tokens after the final LayerNorm.
    registers: [B, R, D] register tokens after the final LayerNorm (R may be 0).
    q, k, v: [B, h, w, D] last block's patch projections feeding attention, heads concatenated;
      for DINOv3 before RoPE (the patch content: after it, key similarity depends on position).
    cls_attention: [B, heads, h, w] last block's softmax attention from CLS to each patch, as the
      model computes it (after RoPE for DINOv3).
    blocks: {block_index: {"q", "k", "v", "tokens"}} each [B, h, w, D], for the requested
      blocks; tokens are that block's output patch tokens, before the final LayerNorm.
  """
  cls: jax.Array
  patch_tokens: jax.Array
  registers: jax.Array
  q: jax.Array
  k: jax.Array
  v: jax.Array
  cls_attention: jax.Array
  blocks: dict[int, dict[str, jax.Array]]


def layer_norm(x: jax.Array, norm: Params, eps: float) -> jax.Array:
  """LayerNorm over the last axis in float32 (as torch), x: [..., D] -> [..., D] float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * norm["scale"] + norm["bias"]


def _dense(x: jax.Array, layer: Params, dtype) -> jax.Array:
  """x @ kernel + bias in the compute dtype, accumulated in float32. x: [..., I] -> [..., O]."""
  y = jnp.matmul(x.astype(dtype), layer["kernel"].astype(dtype), preferred_element_type=jnp.float32)
  return (y + layer["bias"]).astype(dtype)


def _mlp(x: jax.Array, mlp: Params, cfg: ViTConfig, dtype) -> jax.Array:
  if cfg.mlp == "swiglu":
    gate, up = jnp.split(_dense(x, mlp["w12"], dtype), 2, axis=-1)
    return _dense(jax.nn.silu(gate) * up, mlp["w3"], dtype)
  return _dense(jax.nn.gelu(_dense(x, mlp["fc1"], dtype), approximate=False), mlp["fc2"], dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, key_bias: jax.Array | None, dtype) -> jax.Array:
  """softmax(q k^T + bias) v for one image. q, k, v: [N, heads, head_dim] (q pre-scaled); key_bias: [N]."""
  logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32)
  if key_bias is not None:
    logits = logits + key_bias
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("hqk,khd->qhd", probs, v)


def rope_sincos(periods: jax.Array, grid_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """DINOv3's axial RoPE for an h x w patch grid (eval mode: no shift, jitter or rescale).

  Patch centres are normalised per axis to [-1, 1] (so non-square grids work); angle
  2 pi * coordinate / period, the y frequencies then the x ones, the whole repeated for the
  rotate-half pairing.

  Args:
    periods: [head_dim // 4] float32 periods (as stored in Meta's checkpoints, see param_shapes).
    grid_hw: (h, w), static.

  Returns:
    (sin, cos), each [h * w, head_dim] float32, patches in row-major order.
  """
  h, w = grid_hw
  centre = lambda n: (jnp.arange(n, dtype=jnp.float32) + 0.5) / n * 2.0 - 1.0
  coords = jnp.stack(jnp.meshgrid(centre(h), centre(w), indexing="ij"), axis=-1).reshape(h * w, 2)
  angles = 2.0 * jnp.pi * coords[:, :, None] / periods.astype(jnp.float32)  # [hw, 2, head_dim // 4]
  angles = jnp.tile(angles.reshape(h * w, -1), 2)
  return jnp.sin(angles), jnp.cos(angles)


def _token_rope(rope: tuple[jax.Array, jax.Array], first_patch: int) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) of the patches -> [N, 1, head_dim] for every token, the identity (0, 1) on CLS and registers.

  x * 1 + y * 0 == x exactly, so the prefix passes unchanged without a split and concatenation per block.
  """
  sin, cos = rope
  prefix = lambda value: jnp.full((first_patch, sin.shape[-1]), value, jnp.float32)
  return (jnp.concatenate([prefix(0.0), sin])[:, None, :], jnp.concatenate([prefix(1.0), cos])[:, None, :])


def _rope_rotate(t: jax.Array, token_rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """t * cos + rotate_half(t) * sin, in float32. t: [B, N, heads, head_dim]; token_rope from _token_rope."""
  sin, cos = token_rope
  t32 = t.astype(jnp.float32)
  # rotate_half (-second half, first half) as a reversal of the two halves times a sign: fuses elementwise.
  halves = t32.reshape(*t.shape[:-1], 2, t.shape[-1] // 2)
  rotated = (halves[..., ::-1, :] * jnp.array([[-1.0], [1.0]], jnp.float32)).reshape(t.shape)
  return (t32 * cos + rotated * sin).astype(t.dtype)


def _attention(x: jax.Array, attn: Params, cfg: ViTConfig, key_bias: jax.Array | None, rope, dtype,
               attention_loop: str):
  """Multi-head self-attention. x: [B, N, D]; key_bias: [B, N] additive logit bias or None;
  rope: (sin, cos) of every token (see _token_rope) or None; attention_loop: see encode.

  Returns:
    (out [B, N, D], (q, k, v) each [B, N, D], before RoPE).
  """
  batch, tokens, _ = x.shape
  qkv = _dense(x, attn["qkv"], dtype)
  q, k, v = jnp.split(qkv, 3, axis=-1)
  heads = lambda t: t.reshape(batch, tokens, cfg.num_heads, cfg.head_dim)
  q_heads, k_heads = heads(q), heads(k)
  if rope is not None:
    q_heads, k_heads = _rope_rotate(q_heads, rope), _rope_rotate(k_heads, rope)
  operands = (q_heads * jnp.asarray(cfg.head_dim ** -0.5, dtype), k_heads, heads(v), key_bias)
  if attention_loop == "map" or (attention_loop == "auto" and jax.default_backend() == "cpu"):
    # One image at a time keeps the [heads, N, N] logits in cache: ~3x faster than batched on CPU.
    out = jax.lax.map(lambda args: _attend(*args, dtype), operands)
  else:
    out = jax.vmap(_attend, in_axes=(0, 0, 0, 0, None))(*operands, dtype)
  return _dense(out.reshape(batch, tokens, cfg.dim), attn["proj"], dtype), (q, k, v)


def _block(x: jax.Array, block: Params, cfg: ViTConfig, key_bias: jax.Array | None, rope, dtype,
           attention_loop: str):
  """One pre-norm transformer block on the float32 residual stream x: [B, N, D]."""
  attn_out, qkv = _attention(layer_norm(x, block["norm1"], cfg.layer_norm_eps), block["attn"], cfg, key_bias,
                             rope, dtype, attention_loop)
  if cfg.layerscale:
    attn_out = attn_out * block["ls1"].astype(dtype)
  x = x + attn_out.astype(jnp.float32)
  mlp_out = _mlp(layer_norm(x, block["norm2"], cfg.layer_norm_eps), block["mlp"], cfg, dtype)
  if cfg.layerscale:
    mlp_out = mlp_out * block["ls2"].astype(dtype)
  return x + mlp_out.astype(jnp.float32), qkv


def embed(params: Params, images: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Patch embedding + CLS + position embeddings (learned scheme only) + registers.

  Args:
    params: ViT parameters.
    images: [B, H, W, 3] float32, H and W multiples of cfg.patch_size.

  Returns:
    [B, 1 + R + h * w, D] float32 tokens: CLS, registers, patches in row-major order.
  """
  batch, height, width, channels = images.shape
  p = cfg.patch_size
  if height % p or width % p or channels != 3:
    raise ValueError(f"encode: images must be [B, H, W, 3] with H and W multiples of the patch size {p}; "
                     f"got shape {images.shape}.")
  h, w = height // p, width // p
  patches = images.reshape(batch, h, p, w, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(batch, h * w, p * p * 3)
  kernel = params["patch_embed"]["kernel"].reshape(p * p * 3, cfg.dim)
  tokens = jnp.matmul(patches.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)
  tokens = tokens + params["patch_embed"]["bias"]
  cls = params["cls_token"]
  if cfg.pos_scheme == "learned":
    pos = params["pos_embed"]
    tokens = tokens + interpolate_pos_embed(pos[1:], (h, w), cfg.pos_interp)
    cls = cls + pos[0]
  parts = [jnp.broadcast_to(cls, (batch, 1, cfg.dim))]
  if cfg.num_registers:
    parts.append(jnp.broadcast_to(params["register_tokens"], (batch, cfg.num_registers, cfg.dim)))
  parts.append(tokens)
  return jnp.concatenate(parts, axis=1).astype(jnp.float32)


def encode(params: Params, images: jax.Array, cfg: ViTConfig, *, dtype=jnp.float32,
           return_blocks: tuple[int, ...] = (), patch_mask: jax.Array | None = None,
           attention_loop: str = "auto") -> ViTOutput:
  """Runs the ViT and returns its features (see ViTOutput).

  jit with cfg, dtype, return_blocks and attention_loop static, e.g.
  `jax.jit(encode, static_argnames=("cfg", "dtype", "return_blocks", "attention_loop"))`.

  Args:
    params: parameters from init_params, hf_to_params, meta_to_params or load_params.
    images: [B, H, W, 3] float32, normalised with cfg.mean and cfg.std; H, W any multiples of
      cfg.patch_size (non-square too).
    cfg: the architecture.
    dtype: compute dtype of the matrix products (bfloat16 on GPU); LayerNorm, softmax, the
      residual stream and all accumulation stay float32; outputs are float32.
    return_blocks: block indices (0-based, negative counts from the end) whose q/k/v/tokens to
      return in ViTOutput.blocks.
    patch_mask: optional bool [B, h, w]; when given, in every block the keys are restricted to
      CLS, the registers and the patches where the mask is True.
    attention_loop: how attention runs over the batch (static; results agree): "map" one image at
      a time (lax.map), "vmap" all at once, "auto" map on CPU and vmap elsewhere.

  Returns:
    ViTOutput.
  """
  batch, height, width, _ = images.shape
  h, w = height // cfg.patch_size, width // cfg.patch_size
  if attention_loop not in ATTENTION_LOOPS:
    raise ValueError(f"encode: attention_loop must be one of {ATTENTION_LOOPS}, got {attention_loop!r}.")
  wanted = {i % cfg.depth for i in return_blocks}
  if any(not -cfg.depth <= i < cfg.depth for i in return_blocks):
    raise ValueError(f"encode: return_blocks {return_blocks} out of range for depth {cfg.depth}.")
  first_patch = 1 + cfg.num_registers
  key_bias = None
  if patch_mask is not None:
    if patch_mask.shape != (batch, h, w):
      raise ValueError(f"encode: patch_mask must have shape {(batch, h, w)}, got {patch_mask.shape}.")
    keep = jnp.concatenate([jnp.ones((batch, first_patch), bool), patch_mask.reshape(batch, h * w)], axis=1)
    key_bias = jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)

  grid = lambda t: t[:, first_patch:].reshape(batch, h, w, -1).astype(jnp.float32)
  x = embed(params, images, cfg)
  rope = None
  if cfg.pos_scheme == "rope":
    rope = _token_rope(rope_sincos(params["rope_periods"], (h, w)), first_patch)
  blocks_out = {}
  for index in range(cfg.depth):
    block = jax.tree.map(lambda a, i=index: a[i], params["blocks"])
    x, (q, k, v) = _block(x, block, cfg, key_bias, rope, dtype, attention_loop)
    if index in wanted:
      blocks_out[index] = {"q": grid(q), "k": grid(k), "v": grid(v), "tokens": grid(x)}

  # CLS row of the last block's attention, recomputed from its q and k (after RoPE, which leaves
  # CLS's own query alone): a [B, heads, N] slice.
  last_q = q[:, 0].reshape(batch, cfg.num_heads, cfg.head_dim).astype(jnp.float32)
  last_k = k.reshape(batch, -1, cfg.num_heads, cfg.head_dim).astype(jnp.float32)
  if rope is not None:
    last_k = _rope_rotate(last_k, rope)
  cls_logits = jnp.einsum("bhd,bkhd->bhk", last_q * cfg.head_dim ** -0.5, last_k,
                          precision=jax.lax.Precision.HIGHEST)
  if key_bias is not None:
    cls_logits = cls_logits + key_bias[:, None, :]
  cls_attention = jax.nn.softmax(cls_logits, axis=-1)[:, :, first_patch:].reshape(batch, cfg.num_heads, h, w)

  normed = layer_norm(x, params["norm"], cfg.layer_norm_eps)
  return ViTOutput(cls=normed[:, 0], patch_tokens=grid(normed), registers=normed[:, 1:first_patch],
                   q=grid(q), k=grid(k), v=grid(v), cls_attention=cls_attention, blocks=blocks_out)


def param_shapes(cfg: ViTConfig) -> Params:
  """The parameter tree's shapes, {name: ... tuple}; the one place the layout is defined."""
  d, depth, hidden = cfg.dim, cfg.depth, cfg.mlp_hidden_dim
  dense = lambda i, o: {"kernel": (depth, i, o), "bias": (depth, o)}
  norm = {"scale": (depth, d), "bias": (depth, d)}
  if cfg.mlp == "swiglu":
    mlp = {"w12": dense(d, 2 * hidden), "w3": dense(hidden, d)}
  else:
    mlp = {"fc1": dense(d, hidden), "fc2": dense(hidden, d)}
  blocks = {"norm1": norm, "attn": {"qkv": dense(d, 3 * d), "proj": dense(d, d)}, "norm2": norm, "mlp": mlp}
  if cfg.layerscale:
    blocks.update(ls1=(depth, d), ls2=(depth, d))
  shapes = {
      "patch_embed": {"kernel": (cfg.patch_size, cfg.patch_size, 3, d), "bias": (d,)},
      "cls_token": (d,),
      "blocks": blocks,
      "norm": {"scale": (d,), "bias": (d,)},
  }
  if cfg.pos_scheme == "learned":
    shapes["pos_embed"] = (1 + cfg.pos_grid ** 2, d)
  else:
    # RoPE periods are a parameter, not recomputed: Meta's releases store them rounded to bfloat16.
    shapes["rope_periods"] = (cfg.head_dim // 4,)
  if cfg.num_registers:
    shapes["register_tokens"] = (cfg.num_registers, d)
  return shapes


def rope_periods(cfg: ViTConfig) -> jax.Array:
  """[head_dim // 4] float32 RoPE periods rope_base ** (4 i / head_dim), as transformers computes them."""
  exponents = jnp.arange(0, cfg.head_dim // 4, dtype=jnp.float32) * 4 / cfg.head_dim
  return cfg.rope_base ** exponents


def _is_shape(node) -> bool:
  return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ViTConfig, key: jax.Array) -> Params:
  """Random parameters (normal std 0.02 weights, zero biases, unit norms and layerscale, RoPE periods).

  Jitted (one compilation per cfg) with cfg static.

  Args:
    cfg: the architecture.
    key: PRNG key.

  Returns:
    The parameter pytree, float32; kernels are [in, out] (patch_embed [p, p, 3, D]).
  """
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
  # One normal draw sliced into every weight: a single RNG op keeps compilation short.
  sizes = [math.prod(shape) for _, shape in flat]
  noise = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for (path, shape), size in zip(flat, sizes):
    name = jax.tree_util.keystr(path)
    if name == "['rope_periods']":
      out.append(rope_periods(cfg))
    elif "'scale'" in name or "'ls" in name:
      out.append(jnp.ones(shape, jnp.float32))
    elif "'bias'" in name:
      out.append(jnp.zeros(shape, jnp.float32))
    else:
      out.append(noise[offset:offset + size].reshape(shape))
    offset += size
  return jax.tree.unflatten(treedef, out)


class ViT(nn.Module):
  """The backbone as a Flax linen module over the very parameter tree `encode` takes.

  Linen keeps variables as plain nested dicts, so parameters from init_params, hf_to_params,
  meta_to_params or load_params are this module's "params" collection as they are: no copy, no
  renaming, and ViT(cfg).apply({"params": params}, images) == encode(params, images, cfg).
  Inside a larger Flax model the same tree sits under the submodule's name, e.g.
  {"params": {"backbone": params, "head": ...}}. `encode` stays the functional core; `init`
  draws the tree with init_params, one key per top-level entry.

  Attributes:
    cfg: the architecture.
    dtype: compute dtype of the matrix products (see encode).
    return_blocks: block indices whose q/k/v/tokens to return (static, as a module field).
    attention_loop: "auto", "map" or "vmap" (see encode).
  """
  cfg: ViTConfig
  dtype: Any = jnp.float32
  return_blocks: tuple[int, ...] = ()
  attention_loop: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, patch_mask: jax.Array | None = None) -> ViTOutput:
    """images: [B, H, W, 3] float32 normalised with cfg.mean / cfg.std; patch_mask: optional bool [B, h, w] (see encode)."""
    params = {name: self.param(name, lambda key, name=name: init_params(self.cfg, key)[name])
              for name in param_shapes(self.cfg)}
    return encode(params, images, self.cfg, dtype=self.dtype, return_blocks=self.return_blocks,
                  patch_mask=patch_mask, attention_loop=self.attention_loop)
