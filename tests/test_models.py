"""jaxseg.models against transformers (random-init models) and torch's interpolation."""

import dataclasses
import io
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import urllib.error
import zipfile

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from jaxseg import models
from jaxseg.models import checkpoint

TOL = 1e-4
ENCODE = jax.jit(models.encode, static_argnames=("cfg", "dtype", "return_blocks"))


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
  """Perturbs every parameter so zero biases / unit norms / unit layerscale cannot hide a bug."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.2 if re.search(r"norm|layer_scale|lambda", name) else 0.02
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def _hub_names(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
  """transformers v5 in-memory names -> the names stored in the Hub's checkpoints (written independently)."""
  out = {}
  for key, value in state_dict.items():
    key = re.sub(r"^layers\.", "encoder.layer.", key)
    key = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)], key)
    key = key.replace("attention.o_proj", "attention.output.dense")
    key = key.replace("mlp.down_proj", "mlp.weights_out")
    out[key] = value.detach().numpy()
  vit_like = any("layernorm_before" in k for k in out)
  for key in list(out):
    if vit_like:
      new = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
      out[new] = out.pop(key)
  for key in [k for k in out if "mlp.gate_proj" in k]:
    up = key.replace("gate_proj", "up_proj")
    out[key.replace("gate_proj", "weights_in")] = np.concatenate([out.pop(key), out.pop(up)], axis=0)
  return out


def _meta_names(hub: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hub DINOv2 names -> facebookresearch names, fusing q/k/v the way the official qkv is laid out."""
  out = {}
  for key, value in hub.items():
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    if not m:
      key = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.register_tokens": "register_tokens", "embeddings.mask_token": "mask_token",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}[key]
      out[key] = value
      continue
    i, rest = m.groups()
    if ".attention.attention.key" in "." + rest or ".attention.attention.value" in "." + rest:
      continue
    if rest.startswith("attention.attention.query"):
      suffix = rest.rsplit(".", 1)[1]
      parts = [hub[f"encoder.layer.{i}.attention.attention.{n}.{suffix}"] for n in ("query", "key", "value")]
      out[f"blocks.{i}.attn.qkv.{suffix}"] = np.concatenate(parts, axis=0)
      continue
    rest = (rest.replace("attention.output.dense", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
            .replace("layer_scale2.lambda1", "ls2.gamma").replace("mlp.weights_in", "mlp.w12")
            .replace("mlp.weights_out", "mlp.w3"))
    out[f"blocks.{i}.{rest}"] = value
  return out


def _reference(model, images: np.ndarray, last_attention, **kwargs):
  """Runs the torch model; returns last hidden state, hidden states, last-block q/k/v and attentions."""
  captured = {}
  hooks = [getattr(last_attention, f"{n}_proj").register_forward_hook(
      lambda mod, inp, out, n=n: captured.__setitem__(n, out.detach().numpy())) for n in "qkv"]
  try:
    with torch.no_grad():
      out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_attentions=True, output_hidden_states=True,
                  **kwargs)
  finally:
    for h in hooks:
      h.remove()
  return out, captured


def _compare(out: models.ViTOutput, ref, captured, first_patch: int, hw: tuple[int, int], return_blocks=()):
  batch = out.cls.shape[0]
  tokens = ref.last_hidden_state.numpy()
  grid = lambda a: a[:, first_patch:].reshape(batch, *hw, -1)
  errors = {
      "cls": np.abs(out.cls - tokens[:, 0]).max(),
      "patch_tokens": np.abs(out.patch_tokens - grid(tokens)).max(),
      "registers": np.abs(out.registers - tokens[:, 1:first_patch]).max() if first_patch > 1 else 0.0,
      "cls_attention": np.abs(out.cls_attention - grid(ref.attentions[-1][:, :, 0].numpy().transpose(0, 2, 1)
                                                       ).transpose(0, 3, 1, 2)).max(),
  }
  for name in "qkv":
    errors[name] = np.abs(getattr(out, name) - grid(captured[name])).max()
  for index in return_blocks:
    errors[f"block{index}"] = np.abs(out.blocks[index]["tokens"] - grid(ref.hidden_states[index + 1].numpy())).max()
  assert max(errors.values()) <= TOL, errors
  return errors


def _dinov2_cfg(hc, **overrides) -> models.ViTConfig:
  return models.ViTConfig(patch_size=hc.patch_size, dim=hc.hidden_size, depth=hc.num_hidden_layers,
                          num_heads=hc.num_attention_heads, mlp="swiglu" if hc.use_swiglu_ffn else "mlp",
                          layerscale=True, pos_grid=hc.image_size // hc.patch_size, **overrides)


@pytest.fixture(scope="module")
def dinov2():
  hc = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, image_size=518,
                                 patch_size=14, attn_implementation="eager")
  model = _randomize(transformers.Dinov2Model(hc))
  return model, _hub_names(model.state_dict()), _dinov2_cfg(hc, pos_interp="hf")


@pytest.mark.parametrize("size", [(518, 518), (448, 672)])
def test_dinov2_matches_transformers(dinov2, size):
  model, hub, cfg = dinov2
  images = np.random.randn(2, *size, 3).astype(np.float32)
  ref, captured = _reference(model, images, model.encoder.layer[-1].attention)
  out = ENCODE(models.hf_to_params(hub, cfg), images, cfg, return_blocks=(0,))
  _compare(out, ref, captured, 1, (size[0] // 14, size[1] // 14), return_blocks=(0,))


def test_transformers_v5_names_and_prefix_convert_alike(dinov2):
  model, hub, cfg = dinov2
  from_hub = models.hf_to_params(hub, cfg)
  in_memory = {"dinov2." + k: v.numpy() for k, v in model.state_dict().items()}
  jax.tree.map(np.testing.assert_array_equal, from_hub, models.hf_to_params(in_memory, cfg))


def test_meta_names_convert_to_same_params(dinov2):
  _, hub, cfg = dinov2
  meta = {"teacher.backbone." + k: v for k, v in _meta_names(hub).items()}
  assert models.convert.guess_naming(_meta_names(hub)) == "meta"
  jax.tree.map(np.testing.assert_array_equal, models.hf_to_params(hub, cfg), models.meta_to_params(meta, cfg))


@pytest.mark.parametrize("variant", [v for v in models.VARIANTS if v.endswith("_reg")])
def test_register_variants_resize_as_released(variant):
  """facebookresearch's *_reg hubconf: interpolate_antialias=True, interpolate_offset=0 = size (h, w), antialiased."""
  cfg = models.VARIANTS[variant]
  table = np.random.randn(cfg.pos_grid ** 2, 4).astype(np.float32)
  nchw = torch.from_numpy(table).reshape(1, cfg.pos_grid, cfg.pos_grid, 4).permute(0, 3, 1, 2)
  for size in [(32, 32), (32, 48)]:
    ref = torch.nn.functional.interpolate(nchw, size=size, mode="bicubic", align_corners=False, antialias=True)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    np.testing.assert_allclose(models.interpolate_pos_embed(jnp.asarray(table), size, cfg.pos_interp), ref,
                               rtol=0, atol=1e-5)


def test_dinov2_with_registers_matches_transformers():
  """The dinov2_vits14_reg variant's own config (two blocks) against Dinov2WithRegistersModel."""
  cfg = dataclasses.replace(models.VARIANTS["dinov2_vits14_reg"], depth=2)
  hc = transformers.Dinov2WithRegistersConfig(hidden_size=cfg.dim, num_hidden_layers=cfg.depth,
                                              num_attention_heads=cfg.num_heads, image_size=518, patch_size=14,
                                              num_register_tokens=4, attn_implementation="eager")
  model = _randomize(transformers.Dinov2WithRegistersModel(hc))
  assert cfg == _dinov2_cfg(hc, num_registers=4, pos_interp=cfg.pos_interp)
  params = models.hf_to_params(_hub_names(model.state_dict()), cfg)
  for size in [(448, 448), (448, 672)]:
    images = np.random.randn(1, *size, 3).astype(np.float32)
    ref, captured = _reference(model, images, model.encoder.layer[-1].attention)
    _compare(ENCODE(params, images, cfg), ref, captured, 5, (size[0] // 14, size[1] // 14))


def test_swiglu_matches_transformers():
  hc = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112,
                                 patch_size=14, use_swiglu_ffn=True, attn_implementation="eager")
  model = _randomize(transformers.Dinov2Model(hc))
  cfg = _dinov2_cfg(hc, pos_interp="hf")
  hub = _hub_names(model.state_dict())
  assert any("weights_in" in k for k in hub)
  images = np.random.randn(2, 84, 140, 3).astype(np.float32)
  ref, captured = _reference(model, images, model.encoder.layer[-1].attention)
  _compare(ENCODE(models.hf_to_params(hub, cfg), images, cfg), ref, captured, 1, (6, 10))


def test_dino_vits8_matches_transformers_vit():
  hc = transformers.ViTConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536,
                              image_size=224, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True,
                              attn_implementation="eager")
  model = _randomize(transformers.ViTModel(hc, add_pooling_layer=False))
  cfg = models.ViTConfig(patch_size=8, dim=384, depth=2, num_heads=6, pos_grid=28, pos_interp="hf")
  params = models.hf_to_params(_hub_names(model.state_dict()), cfg)
  for size in [(224, 224), (160, 240)]:
    images = np.random.randn(2, *size, 3).astype(np.float32)
    ref, captured = _reference(model, images, model.layers[-1].attention, interpolate_pos_encoding=True)
    _compare(ENCODE(params, images, cfg), ref, captured, 1, (size[0] // 8, size[1] // 8))


@pytest.mark.slow
def test_full_vits14_shape_matches_transformers():
  hc = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                 patch_size=14, attn_implementation="eager")
  model = _randomize(transformers.Dinov2Model(hc))
  cfg = models.VARIANTS["dinov2_vits14"]
  assert cfg == _dinov2_cfg(hc)
  cfg = _dinov2_cfg(hc, pos_interp="hf")
  images = np.random.randn(1, 448, 448, 3).astype(np.float32)
  ref, captured = _reference(model, images, model.encoder.layer[-1].attention)
  out = ENCODE(models.hf_to_params(_hub_names(model.state_dict()), cfg), images, cfg, return_blocks=(5, -1))
  _compare(out, ref, captured, 1, (32, 32), return_blocks=(5, 11))


@pytest.mark.parametrize("mode", ["meta", "hf", "hf_antialias"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48), (37, 48), (74, 20), (5, 8)])
def test_interpolate_pos_embed_matches_torch(mode, size):
  grid, dim = 37, 6
  table = np.random.randn(grid * grid, dim).astype(np.float32)
  nchw = torch.from_numpy(table).reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
  h, w = size
  if mode == "meta":
    ref = torch.nn.functional.interpolate(nchw, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic",
                                          align_corners=False)
  else:
    ref = torch.nn.functional.interpolate(nchw, size=size, mode="bicubic", align_corners=False,
                                          antialias=mode == "hf_antialias")
  ref = ref.permute(0, 2, 3, 1).reshape(h * w, dim).numpy()
  np.testing.assert_allclose(models.interpolate_pos_embed(jnp.asarray(table), size, mode), ref, rtol=0, atol=1e-5)


def test_interpolate_pos_embed_keeps_pretraining_grid():
  table = np.random.randn(37 * 37, 4).astype(np.float32)
  for mode in ("meta", "hf", "hf_antialias"):
    np.testing.assert_array_equal(models.interpolate_pos_embed(jnp.asarray(table), (37, 37), mode), table)


def test_patch_mask_matches_transformers_attention_mask(dinov2):
  model, hub, cfg = dinov2
  images = np.random.randn(2, 112, 140, 3).astype(np.float32)
  mask = np.random.rand(2, 8, 10) > 0.5
  keys = torch.from_numpy(np.concatenate([np.ones((2, 1), bool), mask.reshape(2, -1)], axis=1)).long()
  with torch.no_grad():
    ref = model(torch.from_numpy(images).permute(0, 3, 1, 2), attention_mask=keys).last_hidden_state.numpy()
  params = models.hf_to_params(hub, cfg)
  out = ENCODE(params, images, cfg, patch_mask=jnp.asarray(mask))
  assert np.abs(out.cls - ref[:, 0]).max() <= TOL
  assert np.abs(out.patch_tokens - ref[:, 1:].reshape(2, 8, 10, -1)).max() <= TOL
  np.testing.assert_array_equal(out.cls_attention * ~mask[:, None], 0.0)
  # Changing pixels of masked-out patches must not move CLS.
  pixel_mask = mask.repeat(14, axis=1).repeat(14, axis=2)[..., None]
  changed = np.where(pixel_mask, images, 5.0).astype(np.float32)
  out2 = ENCODE(params, changed, cfg, patch_mask=jnp.asarray(mask))
  np.testing.assert_allclose(out2.cls, out.cls, atol=1e-5)
  full = ENCODE(params, images, cfg, patch_mask=jnp.ones((2, 8, 10), bool))
  np.testing.assert_allclose(full.cls, ENCODE(params, images, cfg).cls, atol=1e-6)


def test_bfloat16_compute_stays_close(dinov2):
  _, hub, cfg = dinov2
  params = models.hf_to_params(hub, cfg)
  images = np.random.randn(1, 112, 112, 3).astype(np.float32)
  f32 = ENCODE(params, images, cfg).patch_tokens
  bf16 = ENCODE(params, images, cfg, dtype=jnp.bfloat16).patch_tokens
  assert bf16.dtype == jnp.float32
  cos = (f32 * bf16).sum(-1) / (jnp.linalg.norm(f32, axis=-1) * jnp.linalg.norm(bf16, axis=-1))
  assert float(cos.min()) > 0.99


def test_init_params_has_the_converted_layout(dinov2):
  _, hub, cfg = dinov2
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(models.init_params(cfg, jax.random.PRNGKey(0))) == shapes(models.hf_to_params(hub, cfg))
  for variant in ("dinov2_vitg14_reg", "dino_vitb8"):
    cfg = models.VARIANTS[variant]
    params = jax.eval_shape(lambda k, cfg=cfg: models.init_params(cfg, k), jax.random.PRNGKey(0))
    out = jax.eval_shape(lambda p, cfg=cfg: models.encode(p, jnp.zeros((1, 4 * cfg.patch_size, 2 * cfg.patch_size, 3)),
                                                          cfg), params)
    assert out.patch_tokens.shape == (1, 4, 2, cfg.dim) and out.registers.shape == (1, cfg.num_registers, cfg.dim)


def test_flax_module_equals_encode_on_the_same_tree():
  cfg = dataclasses.replace(models.VARIANTS["dinov2_vits14_reg"], dim=64, depth=2, num_heads=4)
  images = jnp.asarray(np.random.randn(2, 112, 140, 3).astype(np.float32))
  mask = jnp.asarray(np.random.rand(2, 8, 10) > 0.4)
  variables = jax.jit(models.ViT(cfg).init)(jax.random.PRNGKey(1), images)
  params = variables["params"]
  assert list(variables) == ["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, models.init_params(cfg, jax.random.PRNGKey(0)))
  # Any tree of that layout (here init_params', as a converted checkpoint would be) is the module's params as is.
  params = models.init_params(cfg, jax.random.PRNGKey(2))
  for blocks, patch_mask in [((), None), ((0, -1), mask)]:
    module = models.ViT(cfg, return_blocks=blocks)
    out = jax.jit(module.apply)({"params": params}, images, patch_mask)
    ref = ENCODE(params, images, cfg, return_blocks=blocks, patch_mask=patch_mask)
    assert sorted(out.blocks) == sorted(i % cfg.depth for i in blocks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), out, ref)

  class Probe(flax.linen.Module):  # the backbone embedded in a larger Flax model
    @flax.linen.compact
    def __call__(self, x):
      return flax.linen.Dense(3, name="head")(models.ViT(cfg, name="backbone")(x).cls)

  head = jax.jit(Probe().init)(jax.random.PRNGKey(3), images)["params"]["head"]
  logits = jax.jit(Probe().apply)({"params": {"backbone": params, "head": head}}, images)
  expected = ENCODE(params, images, cfg).cls @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_conversion_errors_name_the_key(dinov2):
  _, hub, cfg = dinov2
  with pytest.raises(models.CheckpointError, match=r"encoder\.layer\.7\.norm1\.weight"):
    models.hf_to_params({**hub, "encoder.layer.7.norm1.weight": np.zeros(384)}, cfg)
  with pytest.raises(models.CheckpointError, match=r"Unknown key 'embeddings\.extra'"):
    models.hf_to_params({**hub, "embeddings.extra": np.zeros(3)}, cfg)
  missing = {k: v for k, v in hub.items() if k != "encoder.layer.1.mlp.fc2.bias"}
  with pytest.raises(models.CheckpointError, match=r"encoder\.layer\.1\.mlp\.fc2\.bias.*\(384,\)"):
    models.hf_to_params(missing, cfg)
  bad = dict(hub, **{"encoder.layer.0.attention.attention.key.weight": np.zeros((384, 383))})
  with pytest.raises(models.CheckpointError, match=r"key\.weight.*\(384, 383\).*\(384, 384\)"):
    models.hf_to_params(bad, cfg)
  with pytest.raises(models.CheckpointError, match=r"blocks\.0\.ls1\.gamma"):
    models.meta_to_params({k: v for k, v in _meta_names(hub).items() if k != "blocks.0.ls1.gamma"}, cfg)


def test_pth_round_trip_through_restricted_unpickler(dinov2, tmp_path):
  _, hub, cfg = dinov2
  meta = {k: torch.from_numpy(np.array(v)) for k, v in _meta_names(hub).items()}
  meta["blocks.0.attn.proj.weight"] = meta["blocks.0.attn.proj.weight"].t().contiguous().t()  # non-contiguous
  meta["norm.weight"] = torch.nn.Parameter(meta["norm.weight"])
  extra = {"half": torch.randn(3, 2).half(), "bf16": torch.randn(5).bfloat16(), "long": torch.arange(4)}
  path = tmp_path / "ckpt.pth"
  torch.save({"teacher": meta, "epoch": 3}, path)
  torch.save(extra, tmp_path / "extra.pth")
  loaded, _ = checkpoint.read_state_dict(path)
  for key, value in meta.items():
    np.testing.assert_array_equal(loaded[key], value.detach().numpy(), err_msg=key)
  for key, value in checkpoint.read_torch(tmp_path / "extra.pth").items():
    np.testing.assert_array_equal(np.asarray(value, np.float32), extra[key].float().numpy(), err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, models.convert_file(path, cfg), models.hf_to_params(hub, cfg))


class _Exploit:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
  target = tmp_path / "pwned"
  torch.save({"weight": torch.zeros(2), "payload": _Exploit(target)}, tmp_path / "evil.pth")
  with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os|nt)\.system"):
    checkpoint.read_state_dict(tmp_path / "evil.pth")
  with open(tmp_path / "plain.pth", "wb") as f:
    pickle.dump(_Exploit(target), f)
  with pytest.raises(ValueError, match="not a torch.save zip archive"):
    checkpoint.read_state_dict(tmp_path / "plain.pth")
  assert not target.exists()


def test_safetensors_and_converted_params_round_trip(dinov2, tmp_path):
  model, hub, cfg = dinov2
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
  params = models.convert_file(tmp_path / "m.safetensors", cfg)
  jax.tree.map(np.testing.assert_array_equal, params, models.hf_to_params(hub, cfg))
  models.save_params(tmp_path / "converted.safetensors", params, cfg)
  assert sorted(os.listdir(tmp_path)) == ["converted.safetensors", "m.safetensors"]  # no temp file left behind
  jax.tree.map(np.testing.assert_array_equal, models.convert_file(tmp_path / "converted.safetensors", cfg), params)


def test_load_params_random_and_offline(tmp_path, monkeypatch):
  with pytest.warns(UserWarning, match=r"random.*dino_vits16.*meaningless"):
    params, cfg = models.load_params("random", "dino_vits16", seed=1)
  assert cfg == models.VARIANTS["dino_vits16"] and params["pos_embed"].shape == (197, 384)
  def offline(*args, **kwargs):
    raise OSError("network is unreachable")
  monkeypatch.setattr("urllib.request.urlopen", offline)
  with pytest.raises(models.WeightsUnavailableError) as info:
    models.load_params("meta", "dinov2_vits14_reg", cache_dir=tmp_path)
  expected_path = tmp_path / "downloads" / "meta" / "dinov2_vits14_reg" / "dinov2_vits14_reg4_pretrain.pth"
  assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth" in str(info.value)
  assert str(expected_path) in str(info.value)
  assert not any(p.is_file() for p in tmp_path.rglob("*"))
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    models.load_params("random", "dinov3")


class _Hub:
  """Stands in for urllib.request.urlopen: serves {url: bytes}, 404 for other Hub URLs, or is offline."""

  def __init__(self, files=None):
    self.files, self.requested = files, []

  def __call__(self, request, timeout=None):
    url = getattr(request, "full_url", request)
    self.requested.append(url)
    if self.files is None:
      raise urllib.error.URLError("network is unreachable")
    if url not in self.files:
      raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
    response = io.BytesIO(self.files[url])
    response.headers = {"Content-Length": str(len(self.files[url]))}
    return response


def _torch_bytes(state_dict) -> bytes:
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, buffer)
  return buffer.getvalue()


@pytest.mark.parametrize("served", [("model.safetensors", "pytorch_model.bin"), ("pytorch_model.bin",)])
def test_hub_weights_prefer_safetensors_and_fall_back_to_bin(dinov2, tmp_path, monkeypatch, served):
  model, hub, cfg = dinov2
  monkeypatch.setitem(models.VARIANTS, "dinov2_vits14", cfg)  # the fixture's two-block model stands in
  urls = models.weights_urls("dinov2_vits14", "hf")
  assert [u.rsplit("/", 1)[1] for u in urls] == ["model.safetensors", "pytorch_model.bin"]
  assert urls[0] == "https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors"
  payload = {"model.safetensors": safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}),
             "pytorch_model.bin": _torch_bytes(hub)}
  server = _Hub({url: payload[url.rsplit("/", 1)[1]] for url in urls if url.rsplit("/", 1)[1] in served})
  monkeypatch.setattr("urllib.request.urlopen", server)
  previous = os.umask(0o022)
  try:
    params = models.load_pretrained("dinov2_vits14", "hf", cache_dir=tmp_path)
  finally:
    os.umask(previous)
  assert server.requested == list(urls[:3 - len(served)])  # the .bin is asked for only when there is no safetensors
  jax.tree.map(np.testing.assert_array_equal, params, models.hf_to_params(hub, cfg))
  files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
  assert sorted(p.name for p in files) == sorted([served[0], "dinov2_vits14-hf.safetensors"])
  assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), [oct(p.stat().st_mode) for p in files]


def test_offline_hub_message_names_both_urls_and_the_smoke_run(tmp_path, monkeypatch):
  monkeypatch.setattr("urllib.request.urlopen", _Hub(None))
  with pytest.raises(models.WeightsUnavailableError) as info:
    models.load_params("hf", "dino_vits8", cache_dir=tmp_path)
  message = str(info.value)
  assert "\n" not in message
  for name in ("model.safetensors", "pytorch_model.bin"):
    assert f"https://huggingface.co/facebook/dino-vits8/resolve/main/{name}" in message
    assert str(tmp_path / "downloads" / "hf" / "dino_vits8" / name) in message
  assert "--config.model.weights=random" in message
  assert not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_converted_params_get_the_umask_mode(dinov2, tmp_path, umask, mode):
  _, hub, cfg = dinov2
  previous = os.umask(umask)
  try:
    models.save_params(tmp_path / "p.safetensors", models.hf_to_params(hub, cfg), cfg)
  finally:
    os.umask(previous)
  assert stat.S_IMODE((tmp_path / "p.safetensors").stat().st_mode) == mode


def _damaged_files(tmp_path, hub):
  """{case: (path, expected message fragment)} of empty, truncated and foreign checkpoint files."""
  whole = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in list(hub.items())[:4]})
  pth = _torch_bytes(dict(list(hub.items())[:4]))
  contents = {
      "empty.safetensors": (b"", "too short"),
      "truncated.safetensors": (whole[:len(whole) // 2], "truncated"),
      "cut_header.safetensors": (whole[:40], "truncated"),
      "foreign.safetensors": (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a whole safetensors file"),
      "json_text.safetensors": (struct.pack("<Q", 5) + b"hello", "not JSON"),
      "empty.pth": (b"", "empty file"),
      "truncated.pth": (pth[:len(pth) // 2], "truncated or damaged zip"),
      "legacy.pth": (pickle.dumps({"weight": [1.0]}), "legacy or plain pickle"),
      "foreign.pth": (b"hello, this is text\n", "not a PyTorch checkpoint"),
  }
  zip_path = tmp_path / "foreign_zip.pth"
  with zipfile.ZipFile(zip_path, "w") as archive:
    archive.writestr("readme.txt", "no pickle here")
  short_path = tmp_path / "short_storage.pth"  # a whole archive whose first tensor's storage lost its second half
  with zipfile.ZipFile(io.BytesIO(pth)) as source, zipfile.ZipFile(short_path, "w") as archive:
    for member in source.namelist():
      data = source.read(member)
      archive.writestr(member, data[:len(data) // 2] if member.endswith("/data/0") else data)
  cases = {"foreign_zip.pth": (zip_path, "data.pkl"), "short_storage.pth": (short_path, "past the end")}
  for name, (data, fragment) in contents.items():
    (tmp_path / name).write_bytes(data)
    cases[name] = (tmp_path / name, fragment)
  return cases


def test_checkpoint_readers_name_the_file_they_fail_on(dinov2, tmp_path):
  _, hub, cfg = dinov2
  for name, (path, fragment) in _damaged_files(tmp_path, hub).items():
    with pytest.raises(ValueError) as info:
      models.convert_file(path, cfg)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and fragment in message, (name, message)
  bad = {**hub, "encoder.layer.0.norm1.weight": np.zeros(3, np.float32)}
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in bad.items()}, tmp_path / "bad.safetensors")
  with pytest.raises(models.CheckpointError, match=rf"^{re.escape(str(tmp_path / 'bad.safetensors'))}: .*norm1"):
    models.convert_file(tmp_path / "bad.safetensors", cfg)


def test_convert_weights_binary(dinov2, tmp_path):
  model, _, _ = dinov2
  hc = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                 patch_size=14)
  full = transformers.Dinov2Model(hc)
  safetensors.torch.save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "in.safetensors")
  out = tmp_path / "out.safetensors"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "experiments.convert_weights", f"--input={tmp_path / 'in.safetensors'}",
                           "--variant=dinov2_vits14", f"--output={out}"], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  params, cfg = models.load_params(str(out), "dinov2_vits14")
  np.testing.assert_array_equal(params["norm"]["scale"], full.layernorm.weight.detach().numpy())
