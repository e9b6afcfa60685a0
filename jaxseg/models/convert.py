"""Checkpoint state dicts (transformers or facebookresearch names) to jaxseg ViT parameters.

Both front ends parse each key into (block index or None, canonical part name), then one
assembly step checks every shape against the config, transposes torch [out, in] weights to
[in, out], fuses q/k/v (and SwiGLU gate/up), and stacks the blocks. Any unknown, missing or
mis-shaped key raises before anything is returned.

DINOv3 specifics: the key bias is absent (transformers) or zeroed by the stored `bias_mask`
(facebookresearch), and the RoPE periods are taken as Meta stored them (bfloat16-rounded in the
releases) or, for transformers checkpoints, which store none, computed as transformers does.
"""

import re
from typing import Mapping

import numpy as np

from jaxseg.models.config import ViTConfig
from jaxseg.models.vit import Params, rope_periods

# Leading module prefixes that wrappers add (HF task models, DDP, DINO training checkpoints).
_PREFIXES = ("model.", "dinov2.", "dinov2_with_registers.", "vit.", "module.", "backbone.", "teacher.")
# Keys that carry no part of the backbone's inference path.
# local_cls_norm: DINOv3's norm of local crops' CLS, used only in training (dinov3 vision_transformer.py).
_IGNORED = re.compile(r"^(embeddings\.)?mask_token$|^pooler\.|^head\.|^classifier\.|^local_cls_norm\.")

_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "embeddings.patch_embeddings.weight": "patch_embed.weight",  # DINOv3
    "embeddings.patch_embeddings.bias": "patch_embed.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_BLOCK = {
    "norm1": "norm1", "layernorm_before": "norm1", "norm2": "norm2", "layernorm_after": "norm2",
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "proj", "attention.o_proj": "proj",
    "layer_scale1.lambda1": "ls1", "layer_scale2.lambda1": "ls2",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2", "intermediate.dense": "fc1", "output.dense": "fc2",
    "mlp.weights_in": "w12", "mlp.weights_out": "w3",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "w3",
}
_HF_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers|layer)\.(\d+)\.(.+?)(?:\.(weight|bias))?$")

_META_GLOBAL = {
    "cls_token": "cls_token", "pos_embed": "pos_embed", "register_tokens": "register_tokens",
    "storage_tokens": "register_tokens", "rope_embed.periods": "rope_periods",
    "patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_META_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attn.qkv": "qkv", "attn.qkv.bias_mask": "qkv_mask", "attn.proj": "proj",
    "ls1.gamma": "ls1", "ls2.gamma": "ls2",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2", "mlp.w12": "w12", "mlp.w1": "gate", "mlp.w2": "up", "mlp.w3": "w3",
}
_META_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


class CheckpointError(ValueError):
  """A checkpoint does not fit the config: names the key and both shapes."""


def _strip_prefix(key: str, known: Mapping[str, str], block_key: re.Pattern) -> str:
  while not (key in known or block_key.match(key) or _IGNORED.match(key)):
    prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
    if prefix is None:
      return key
    key = key[len(prefix):]
  return key


def _parse(state_dict: Mapping[str, np.ndarray], known: Mapping[str, str], block_parts: Mapping[str, str],
           block_key: re.Pattern, naming: str) -> dict[tuple[int | None, str], tuple[str, np.ndarray]]:
  """Maps every key to (block index or None, canonical name like 'q.weight'); unknown keys raise."""
  parts = {}
  for key, value in state_dict.items():
    name = _strip_prefix(key, known, block_key)
    if _IGNORED.match(name):
      continue
    if name in known:
      parts[(None, known[name])] = (key, np.asarray(value))
      continue
    match = block_key.match(name)
    if match and match.group(2) in block_parts:
      part = block_parts[match.group(2)]
      suffix = match.group(3)
      canonical = part if suffix is None else f"{part}.{suffix}"
      parts[(int(match.group(1)), canonical)] = (key, np.asarray(value))
      continue
    raise CheckpointError(f"Unknown key {key!r} (shape {tuple(np.shape(value))}) for {naming} naming; "
                          f"is this a {naming} checkpoint of the right model?")
  return parts


def _has_bias(name: str, cfg: ViTConfig) -> bool:
  """Whether a checkpoint stores a bias for linear `name` (the fused qkv stores the key's, masked)."""
  if name in ("q", "k", "v", "qkv"):
    return cfg.qkv_bias and (name != "k" or cfg.key_bias)
  return True


def _expected_shapes(cfg: ViTConfig, parts, naming: str) -> dict[tuple[int | None, str], tuple[int, ...]]:
  """Torch-layout shape of every part the config needs, given which fusions the checkpoint uses."""
  d, hidden, p = cfg.dim, cfg.mlp_hidden_dim, cfg.patch_size
  shapes = {
      (None, "cls_token"): (1, 1, d),
      (None, "patch_embed.weight"): (d, 3, p, p), (None, "patch_embed.bias"): (d,),
      (None, "norm.weight"): (d,), (None, "norm.bias"): (d,),
  }
  if cfg.pos_scheme == "learned":
    shapes[(None, "pos_embed")] = (1, 1 + cfg.pos_grid ** 2, d)
  elif naming == "facebookresearch":  # transformers stores no periods
    shapes[(None, "rope_periods")] = (cfg.head_dim // 4,)
  if cfg.num_registers:
    shapes[(None, "register_tokens")] = (1, cfg.num_registers, d)
  for i in range(cfg.depth):
    linear = {"proj": (d, d)}
    linear.update({"qkv": (3 * d, d)} if (i, "qkv.weight") in parts else {"q": (d, d), "k": (d, d), "v": (d, d)})
    if cfg.mlp == "swiglu":
      fused = (i, "w12.weight") in parts
      linear.update({"w12": (2 * hidden, d)} if fused else {"gate": (hidden, d), "up": (hidden, d)})
      linear["w3"] = (d, hidden)
    else:
      linear.update(fc1=(hidden, d), fc2=(d, hidden))
    for name, shape in linear.items():
      shapes[(i, f"{name}.weight")] = shape
      if _has_bias(name, cfg):
        shapes[(i, f"{name}.bias")] = shape[:1]
    if (i, "qkv.weight") in parts and cfg.qkv_bias and not cfg.key_bias:
      shapes[(i, "qkv_mask")] = (3 * d,)  # Meta's bias_mask, which zeroes the key's third
    for norm in ("norm1", "norm2"):
      shapes[(i, f"{norm}.weight")] = shapes[(i, f"{norm}.bias")] = (d,)
    if cfg.layerscale:
      shapes[(i, "ls1")] = shapes[(i, "ls2")] = (d,)
  return shapes


def _source_name(where: tuple[int | None, str], known: Mapping[str, str], block_parts: Mapping[str, str],
                 block_prefix: str) -> str:
  """A checkpoint key, in the checkpoint's own naming, for a canonical part (for error messages)."""
  block, name = where
  if block is None:
    return next(k for k, v in known.items() if v == name)
  part, _, suffix = name.partition(".")
  source = next(k for k, v in block_parts.items() if v == part)
  return f"{block_prefix}{block}.{source}" + (f".{suffix}" if suffix else "")


def _check(parts, cfg: ViTConfig, naming: str, source_name) -> None:
  expected = _expected_shapes(cfg, parts, naming)
  for where, (key, value) in parts.items():
    if where not in expected:
      raise CheckpointError(f"Unexpected key {key!r} (shape {value.shape}) for config {cfg}.")
    if value.shape != expected[where]:
      raise CheckpointError(f"Key {key!r} has shape {value.shape}, expected {expected[where]} for config {cfg}.")
  missing = [where for where in expected if where not in parts]
  if missing:
    raise CheckpointError(f"Missing {len(missing)} key(s) in the {naming} checkpoint, first: "
                          f"{source_name(missing[0])!r} with shape {expected[missing[0]]} (config {cfg}).")


def _assemble(parts, cfg: ViTConfig) -> Params:
  """Canonical torch-layout parts (already checked) -> the jaxseg parameter tree."""
  f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
  get = lambda block, name: parts[(block, name)][1]

  def bias(i: int, name: str) -> np.ndarray:
    if not _has_bias(name, cfg):
      return np.zeros(get(i, f"{name}.weight").shape[:1], np.float32)
    if (i, f"{name}_mask") in parts:  # Meta multiplies the stored bias by its mask in every forward pass
      return get(i, f"{name}.bias") * get(i, f"{name}_mask")
    return get(i, f"{name}.bias")

  def linear(names: tuple[str, ...]):
    kernels, biases = [], []
    for i in range(cfg.depth):
      kernels.append(np.concatenate([get(i, f"{n}.weight") for n in names], axis=0).T)
      biases.append(np.concatenate([bias(i, n) for n in names]))
    return {"kernel": f32(np.stack(kernels)), "bias": f32(np.stack(biases))}

  def norm(name: str):
    return {"scale": f32(np.stack([get(i, f"{name}.weight") for i in range(cfg.depth)])),
            "bias": f32(np.stack([get(i, f"{name}.bias") for i in range(cfg.depth)]))}

  fused_qkv = (0, "qkv.weight") in parts
  blocks = {
      "norm1": norm("norm1"),
      "attn": {"qkv": linear(("qkv",) if fused_qkv else ("q", "k", "v")),
               "proj": linear(("proj",))},
      "norm2": norm("norm2"),
  }
  if cfg.mlp == "swiglu":
    blocks["mlp"] = {"w12": linear(("w12",) if (0, "w12.weight") in parts else ("gate", "up")),
                     "w3": linear(("w3",))}
  else:
    blocks["mlp"] = {"fc1": linear(("fc1",)), "fc2": linear(("fc2",))}
  if cfg.layerscale:
    blocks["ls1"] = f32(np.stack([get(i, "ls1") for i in range(cfg.depth)]))
    blocks["ls2"] = f32(np.stack([get(i, "ls2") for i in range(cfg.depth)]))
  params = {
      "patch_embed": {"kernel": f32(get(None, "patch_embed.weight").transpose(2, 3, 1, 0)),
                      "bias": f32(get(None, "patch_embed.bias"))},
      "cls_token": f32(get(None, "cls_token").reshape(cfg.dim)),
      "blocks": blocks,
      "norm": {"scale": f32(get(None, "norm.weight")), "bias": f32(get(None, "norm.bias"))},
  }
  if cfg.pos_scheme == "learned":
    params["pos_embed"] = f32(get(None, "pos_embed")[0])
  elif (None, "rope_periods") in parts:
    params["rope_periods"] = f32(get(None, "rope_periods"))
  else:
    params["rope_periods"] = f32(rope_periods(cfg))
  if cfg.num_registers:
    params["register_tokens"] = f32(get(None, "register_tokens")[0])
  return params


def _plain_mlp_name(name: str) -> str:
  """DINOv3's transformers GELU MLP is up_proj / down_proj: fc1 / fc2 under other names."""
  part, dot, suffix = name.partition(".")
  return {"up": "fc1", "w3": "fc2"}.get(part, part) + dot + suffix


def _convert(state_dict, cfg, known, block_parts, block_key, block_prefix, naming) -> Params:
  parts = _parse(state_dict, known, block_parts, block_key, naming)
  if cfg.mlp == "mlp":
    parts = {(block, _plain_mlp_name(name)): value for (block, name), value in parts.items()}
  _check(parts, cfg, naming, lambda where: _source_name(where, known, block_parts, block_prefix))
  return _assemble(parts, cfg)


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: ViTConfig) -> Params:
  """Converts a transformers Dinov2 / Dinov2WithRegisters / ViT (DINO) / DINOv3ViT state dict.

  Args:
    state_dict: name -> array (numpy or anything np.asarray accepts). Names as stored on the Hub
      (encoder.layer.N.attention.attention.query.weight, mlp.weights_in, intermediate.dense, ...;
      DINOv3: layer.N.attention.q_proj.weight, layer.N.layer_scale1.lambda1, mlp.up_proj, ...)
      or as transformers v5 holds them in memory (attention.q_proj, mlp.gate_proj, layers.N,
      model.layer.N, ...), optionally under a model prefix (dinov2., vit., model., ...).
      mask_token and pooler are ignored. DINOv3's RoPE periods, which transformers recomputes
      rather than stores, are computed as it does.
    cfg: the architecture the weights must fit.

  Returns:
    jaxseg parameters (numpy float32 arrays).

  Raises:
    CheckpointError: an unknown, missing or mis-shaped key (the message names it and both shapes).
  """
  return _convert(state_dict, cfg, _HF_GLOBAL, _HF_BLOCK, _HF_BLOCK_KEY, "encoder.layer.", "transformers")


def meta_to_params(state_dict: Mapping[str, np.ndarray], cfg: ViTConfig) -> Params:
  """Converts a facebookresearch DINO / DINOv2 / DINOv3 state dict (cls_token, blocks.N.attn.qkv, mlp.w12, ...).

  Args:
    state_dict: name -> array, optionally under module. / backbone. / teacher. prefixes. DINOv3:
      storage_tokens, blocks.N.attn.qkv.bias_mask (applied to the bias), blocks.N.ls1.gamma,
      mlp.w1 / w2 / w3 or mlp.fc1 / fc2, rope_embed.periods (used as stored); local_cls_norm
      (training only) is ignored.
    cfg: the architecture the weights must fit.

  Returns:
    jaxseg parameters (numpy float32 arrays).

  Raises:
    CheckpointError: an unknown, missing or mis-shaped key (the message names it and both shapes).
  """
  return _convert(state_dict, cfg, _META_GLOBAL, _META_BLOCK, _META_BLOCK_KEY, "blocks.", "facebookresearch")


def guess_naming(keys) -> str:
  """'hf' or 'meta' from a checkpoint's key names (transformers keys all mention embeddings/layer)."""
  keys = list(keys)
  if any("embeddings." in k or "encoder.layer." in k or re.match(r"(model\.)?layers?\.", k) for k in keys):
    return "hf"
  if any(k.endswith("cls_token") or ".attn.qkv." in k or k.startswith("blocks.") for k in keys):
    return "meta"
  raise CheckpointError(f"Cannot tell the checkpoint's naming from its keys (first: {keys[:5]}).")
