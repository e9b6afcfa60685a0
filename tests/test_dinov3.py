"""DINOv3 backbones against transformers' DINOv3ViTModel, through transformers' and Meta's key names."""

import dataclasses
import http.server
import os
import pathlib
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from jaxseg import models
from jaxseg.models import vit
from test_models import ENCODE, _compare, _randomize, _reference


def _hf_config(cfg: models.ViTConfig) -> transformers.DINOv3ViTConfig:
  """The transformers config of a jaxseg DINOv3 config (written from transformers' field names)."""
  return transformers.DINOv3ViTConfig(
      hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_hidden_dim, use_gated_mlp=cfg.mlp == "swiglu", hidden_act="silu" if cfg.mlp == "swiglu"
      else "gelu", num_register_tokens=cfg.num_registers, layer_norm_eps=cfg.layer_norm_eps, rope_theta=cfg.rope_base,
      query_bias=cfg.qkv_bias, value_bias=cfg.qkv_bias, key_bias=False, attn_implementation="eager")


def _meta_names(memory: dict[str, np.ndarray], periods: np.ndarray) -> dict[str, np.ndarray]:
  """transformers in-memory DINOv3 names -> facebookresearch/dinov3 names (mapped here independently).

  The fused qkv bias gets a random key third that only Meta's bias_mask zeroes, and a
  local_cls_norm (training only) is added, so neither can be forgotten silently.
  """
  rng = np.random.default_rng(1)
  out = {"rope_embed.periods": periods, "local_cls_norm.weight": rng.normal(size=memory["norm.weight"].shape)}
  gated = any("gate_proj" in k for k in memory)
  mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else {"up_proj": "fc1", "down_proj": "fc2"}
  for key, value in memory.items():
    m = re.match(r"model\.layer\.(\d+)\.(.*)", key)
    if not m:
      out[{"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
           "embeddings.mask_token": "mask_token", "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias"}[key]] = value.reshape(-1, value.shape[-1]) if "mask" in key else value
      continue
    i, rest = m.groups()
    block = f"blocks.{i}."
    if rest.startswith("attention.q_proj."):
      suffix = rest.rsplit(".", 1)[1]
      if suffix == "bias":
        q, v = value, memory[f"model.layer.{i}.attention.v_proj.bias"]
        out[block + "attn.qkv.bias"] = np.concatenate([q, rng.normal(size=q.shape).astype(q.dtype), v])
        out[block + "attn.qkv.bias_mask"] = np.repeat(np.array([1, 0, 1], q.dtype), q.shape[0])
      else:
        out[block + "attn.qkv.weight"] = np.concatenate(
            [memory[f"model.layer.{i}.attention.{n}_proj.weight"] for n in "qkv"], axis=0)
    elif rest.startswith(("attention.k_proj.", "attention.v_proj.")):
      continue
    else:
      rest = rest.replace("attention.o_proj", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
      rest = rest.replace("layer_scale2.lambda1", "ls2.gamma")
      rest = re.sub(r"mlp\.(\w+_proj)", lambda n: "mlp." + mlp[n.group(1)], rest)
      out[block + rest] = value
  return out


def _case(cfg: models.ViTConfig, seed: int = 0):
  """(torch model with every parameter perturbed, in-memory state dict, Hub-stored state dict)."""
  torch.manual_seed(seed)
  model = _randomize(transformers.DINOv3ViTModel(_hf_config(cfg)))
  memory = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  hub = {re.sub(r"^model\.", "", k): v for k, v in memory.items()}  # the Hub's files store layer.N.
  return model, memory, hub


def _meta_case(model, memory):
  """Meta names with bfloat16-rounded periods (as released), and the torch model set to use those periods."""
  periods = (1.0 / model.rope_embeddings.inv_freq.numpy()).astype(ml_dtypes.bfloat16).astype(np.float32)
  model.rope_embeddings.inv_freq.copy_(torch.from_numpy(1.0 / periods))
  return _meta_names(memory, periods), periods


def _check_parity(cfg, model, state_dict, convert, size):
  images = np.random.default_rng(2).normal(size=(2, *size, 3)).astype(np.float32)
  params = convert(state_dict, cfg)
  out = jax.device_get(ENCODE(params, images, cfg))
  ref, captured = _reference(model, images, model.model.layer[-1].attention)
  return _compare(out, ref, captured, 1 + cfg.num_registers, (size[0] // 16, size[1] // 16))


SMALL = dataclasses.replace(models.VARIANTS["dinov3_vits16"], dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize("cfg", [
    SMALL,
    dataclasses.replace(models.VARIANTS["dinov3_vits16plus"], dim=64, depth=2, num_heads=4),  # S+ / H+ SwiGLU
    # 7B layout: no q/v bias, hidden width rounded to 64 (dim 80: 160 -> 192, where 8 would keep 160).
    dataclasses.replace(models.VARIANTS["dinov3_vit7b16"], dim=80, depth=2, num_heads=4),
], ids=["gelu", "swiglu", "7b_layout"])
def test_small_dinov3_matches_transformers_through_both_key_sets(cfg):
  model, memory, hub = _case(cfg)
  assert all(np.any(v != 0) for k, v in memory.items() if "mask_token" not in k)
  errors = {"hub": _check_parity(cfg, model, hub, models.hf_to_params, (32, 48)),
            "memory": _check_parity(cfg, model, memory, models.hf_to_params, (48, 32))}
  meta, _ = _meta_case(model, memory)
  errors["meta"] = _check_parity(cfg, model, meta, models.meta_to_params, (32, 48))
  print(cfg.mlp, cfg.qkv_bias, {k: max(v.values()) for k, v in errors.items()})


@pytest.mark.parametrize("size", [pytest.param((448, 672), marks=pytest.mark.slow), (224, 224)])
def test_dinov3_vits16_real_size_matches_transformers_through_both_key_sets(size):
  cfg = models.VARIANTS["dinov3_vits16"]
  model, _, hub = _case(cfg)
  errors = {"hub": _check_parity(cfg, model, hub, models.hf_to_params, size)}
  meta, _ = _meta_case(model, {k: v.detach().numpy() for k, v in model.state_dict().items()})
  errors["meta"] = _check_parity(cfg, model, meta, models.meta_to_params, size)
  print(size, {k: max(v.values()) for k, v in errors.items()})


def test_meta_periods_are_used_as_stored():
  model, memory, _ = _case(SMALL)
  meta, periods = _meta_case(model, memory)
  params = models.meta_to_params(meta, SMALL)
  np.testing.assert_array_equal(params["rope_periods"], periods)
  assert np.abs(periods - np.asarray(vit.rope_periods(SMALL))).max() > 1e-3  # bfloat16 rounding shows


def test_rope_sin_cos_match_transformers_on_a_non_square_grid():
  cfg = models.VARIANTS["dinov3_vitb16"]
  rope = transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTRopePositionEmbedding(_hf_config(cfg)).eval()
  cos, sin = (t.numpy() for t in rope(torch.zeros(1, 3, 16 * 7, 16 * 12)))
  ours_sin, ours_cos = jax.device_get(vit.rope_sincos(vit.rope_periods(cfg), (7, 12)))
  assert ours_sin.shape == sin.shape == (84, cfg.head_dim)
  np.testing.assert_allclose(ours_sin, sin, atol=1e-5)
  np.testing.assert_allclose(ours_cos, cos, atol=1e-5)


def test_dinov3_variants_follow_the_release():
  v = models.VARIANTS
  assert [v[n].dim for n in ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16",
                             "dinov3_vith16plus", "dinov3_vit7b16")] == [384, 384, 768, 1024, 1280, 4096]
  assert v["dinov3_vith16plus"].mlp_hidden_dim == 5120 and v["dinov3_vit7b16"].mlp_hidden_dim == 8192
  assert not v["dinov3_vit7b16"].qkv_bias and v["dinov3_vitl16"].qkv_bias
  assert v["dinov3_vitl16"].mean == models.config.IMAGENET_MEAN
  assert v["dinov3_vitl16_sat"].mean == (0.430, 0.411, 0.296) and v["dinov3_vitl16_sat"].std == (0.213, 0.156, 0.143)
  assert dataclasses.replace(v["dinov3_vitl16_sat"], mean=v["dinov3_vitl16"].mean,
                             std=v["dinov3_vitl16"].std) == v["dinov3_vitl16"]


def test_wrong_variant_checkpoint_is_named_by_key_and_shape():
  _, _, hub = _case(SMALL)
  bigger = dataclasses.replace(SMALL, dim=128, num_heads=8)
  with pytest.raises(models.CheckpointError, match=r"'embeddings\.cls_token' has shape \(1, 1, 64\), expected "
                                                   r"\(1, 1, 128\)"):
    models.hf_to_params(hub, bigger)
  with pytest.raises(models.CheckpointError, match=r"Missing .*'embeddings\.position_embeddings'"):
    models.hf_to_params(hub, dataclasses.replace(SMALL, pos_scheme="learned", key_bias=True, pos_grid=2))
  meta, _ = _meta_case(*_case(SMALL)[:2])
  with pytest.raises(models.CheckpointError, match=r"Missing .*'blocks\.0\.attn\.qkv\.bias_mask'"):
    models.meta_to_params({k: v for k, v in meta.items() if "bias_mask" not in k}, SMALL)


def test_flax_module_and_smaller_family_member_run_non_square():
  cfg = dataclasses.replace(models.VARIANTS["dinov3_vitl16_sat"], dim=32, depth=1, num_heads=2)
  images = np.zeros((1, 32, 64, 3), np.float32)
  variables = models.ViT(cfg).init(jax.random.PRNGKey(0), images)
  assert variables["params"]["rope_periods"].shape == (4,) and "pos_embed" not in variables["params"]
  out = models.ViT(cfg).apply(variables, images)
  assert out.patch_tokens.shape == (1, 2, 4, 32) and out.registers.shape == (1, 4, 32)


class _GatedHub(http.server.BaseHTTPRequestHandler):
  """A loopback Hub whose repositories are gated: 401 without a token, 403 with one (access not granted)."""
  seen: list = []

  def do_GET(self):  # noqa: N802 (http.server's name)
    token = self.headers.get("Authorization")
    type(self).seen.append((self.path, token))
    self.send_response(403 if token else 401)
    self.send_header("Content-Length", "0")
    self.end_headers()

  def log_message(self, *args):
    pass


@pytest.fixture
def gated_hub(monkeypatch, tmp_path):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  _GatedHub.seen = []
  endpoint = f"http://127.0.0.1:{server.server_address[1]}"
  monkeypatch.setenv("HF_ENDPOINT", endpoint)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  yield endpoint
  server.shutdown()
  server.server_close()


def _assert_gated_message(message: str, endpoint: str, cache: pathlib.Path):
  assert "\n" not in message
  for fragment in (f"{endpoint}/facebook/dinov3-vits16-pretrain-lvd1689m is gated", "HF_TOKEN",
                   "--config.model.weights=/path/file", "Meta's e-mailed .pth"):
    assert fragment in message, (fragment, message)
  assert not any(p.is_file() for p in cache.rglob("*")), list(cache.rglob("*"))


def test_gated_download_without_token_is_refused_with_a_way_out(gated_hub, tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(models.WeightsUnavailableError, match="HTTP Error 401") as info:
    models.load_params("hf", "dinov3_vits16", cache_dir=cache)
  _assert_gated_message(str(info.value), gated_hub, cache)
  assert "no token was found" in str(info.value)
  assert _GatedHub.seen == [("/facebook/dinov3-vits16-pretrain-lvd1689m/resolve/main/model.safetensors", None)]


@pytest.mark.parametrize("where", ["env", "hf_home_file"])
def test_gated_download_sends_the_token_and_names_a_refusal(gated_hub, tmp_path, monkeypatch, where):
  if where == "env":
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
  else:
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text("hf_from_file\n")
  cache = tmp_path / "cache"
  with pytest.raises(models.WeightsUnavailableError, match="HTTP Error 403") as info:
    models.load_params("hf", "dinov3_vits16", cache_dir=cache)
  _assert_gated_message(str(info.value), gated_hub, cache)
  assert "the token sent was refused" in str(info.value)
  assert [token for _, token in _GatedHub.seen] == ["Bearer " + ("hf_from_env" if where == "env" else "hf_from_file")]


def test_gated_download_ends_the_runner_with_one_error_line(gated_hub, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAXSEG_CACHE=str(tmp_path / "cache"))
  out = subprocess.run([sys.executable, "-m", "experiments.segment", "--config=configs/demo.py",
                        f"--workdir={tmp_path / 'work'}", "--config.model.variant=dinov3_vits16",
                        "--config.model.weights=hf", "--config.image_size=32"],
                       cwd=pathlib.Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  _assert_gated_message(lines[0], gated_hub, tmp_path / "cache")


def test_meta_source_of_dinov3_points_to_the_local_file_route():
  with pytest.raises(models.WeightsUnavailableError, match=r"e-mailed on request.*--config\.model\.weights=/path"):
    models.weights_urls("dinov3_vitl16_sat", "meta")
  assert models.weights_url("dinov3_vitl16_sat", "hf").endswith(
      "/facebook/dinov3-vitl16-pretrain-sat493m/resolve/main/model.safetensors")


# ---- normalisation, the runner and the analysis ---------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAT_MEAN, SAT_STD = np.array([0.430, 0.411, 0.296]), np.array([0.213, 0.156, 0.143])  # dinov3 README, by hand


def test_prepare_images_and_batches_normalise_with_the_variant():
  import jaxseg.data
  photo = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  resized = np.asarray(PIL.Image.fromarray(photo).resize((32, 32), PIL.Image.BICUBIC), np.float64)
  np.testing.assert_allclose(jaxseg.data.prepare_images([photo], 32, "dinov3_vitl16_sat")[0],
                             (resized / 255 - SAT_MEAN) / SAT_STD, atol=1e-5)
  np.testing.assert_allclose(jaxseg.data.prepare_images([photo], 32, models.VARIANTS["dinov3_vitl16"])[0],
                             (resized / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
                             atol=1e-5)
  cfg = models.VARIANTS["dinov3_vit7b16_sat"]
  batch = next(iter(jaxseg.data.batches([{"id": "a", "image": photo}], batch_size=1, image_size=32, patch_size=16,
                                        mean=cfg.mean, std=cfg.std)))
  np.testing.assert_allclose(batch["image"][0], (resized / 255 - SAT_MEAN) / SAT_STD, atol=1e-5)


@pytest.mark.slow
def test_segment_runner_end_to_end_takes_the_normalisation_from_the_variant(tmp_path, monkeypatch):
  import fixtures
  import jaxseg.data
  from experiments import runner
  small = dataclasses.replace(models.VARIANTS["dinov3_vitl16_sat"], dim=32, depth=2, num_heads=2)
  monkeypatch.setitem(models.VARIANTS, "dinov3_vitl16_sat", small)  # a SAT model of the family, small
  folder = fixtures.make_photo_folder(tmp_path / "photos", {"a": (40, 52), "b": (48, 40), "c": (44, 44)})
  config = fixtures.segment_config(ROOT / "configs" / "voc_dinov3_vits16.py", **{
      "data.name": f"folder:{folder}", "model.variant": "dinov3_vitl16_sat", "model.weights": "random",
      "image_size": 48, "batch_size": 2, "crf.iterations": 2, "gallery_size": 2})
  runner.run(config, tmp_path / "work")
  assert {name[:-4]: p.shape for name, p in fixtures.read_pngs(tmp_path / "work" / "predictions").items()} == {
      "a": (40, 52), "b": (48, 40), "c": (44, 44)}
  cls = {}
  for path in (tmp_path / "work" / "features").glob("*.npz"):
    with np.load(path) as f:
      cls.update({int(i): c for i, c in zip(f["index"], f["cls"]) if i >= 0})
  photos = [np.asarray(PIL.Image.open(folder / f"{n}.jpg").convert("RGB")) for n in "abc"]
  params = models.init_params(small, jax.random.PRNGKey(0))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  expected = unit(np.asarray(ENCODE(params, jaxseg.data.prepare_images(photos, 48, small), small).cls))
  imagenet = unit(np.asarray(ENCODE(params, jaxseg.data.prepare_images(photos, 48), small).cls))
  ours = unit(np.stack([cls[i] for i in range(3)]).astype(np.float32))
  assert np.abs(ours - expected).max() <= 1e-4 < np.abs(ours - imagenet).max()


@pytest.mark.slow
def test_analysis_binary_with_a_dinov3_backbone(tmp_path):
  import fixtures
  fixtures.make_voc_devkit(tmp_path / "manual", n_train=2, n_val=2)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.analyze_features", f"--workdir={tmp_path / 'work'}",
       "--config=configs/analyze_voc.py", "--config.model.weights=random", "--config.backbones=('dinov3_vits16',)",
       f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.manual_dir={tmp_path / 'manual'}",
       "--config.image_size=64", "--config.batch_size=2", "--config.blocks=(-1,)", "--config.features=('k', 'q')",
       "--config.method.num_categories=2", "--config.method.sample_budget=500", "--config.two_means.n_init=1",
       "--config.probe.steps=20", "--config.figure_images=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  text = (tmp_path / "work" / "analysis.md").read_text()
  assert "| dinov3_vits16 |" in text
  assert (tmp_path / "work" / "figures" / "heatmap_dinov3_vits16.png").is_file()


def test_attention_loops_agree_on_cpu():
  """The non-CPU branch (vmap over the batch) run here against the CPU one (lax.map), masked and not."""
  encode = jax.jit(models.encode, static_argnames=("cfg", "return_blocks", "attention_loop"))
  params = models.init_params(SMALL, jax.random.PRNGKey(3))
  images = np.random.default_rng(4).normal(size=(3, 32, 48, 3)).astype(np.float32)
  patch_mask = np.random.default_rng(5).random((3, 2, 3)) < 0.6
  for mask in (None, patch_mask):
    outs = {loop: jax.device_get(encode(params, images, SMALL, patch_mask=mask, return_blocks=(0,),
                                        attention_loop=loop)) for loop in ("map", "vmap", "auto")}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), outs["map"], outs["vmap"])
    jax.tree.map(np.testing.assert_array_equal, outs["map"], outs["auto"])  # auto is map on CPU
  with pytest.raises(ValueError, match="attention_loop must be one of"):
    models.encode(params, images, SMALL, attention_loop="scan")


@pytest.mark.parametrize("variant", [v for v in models.VARIANTS if v.startswith("dinov3_")])
def test_every_dinov3_variant_builds_and_runs_non_square(variant):
  cfg = models.VARIANTS[variant]
  params = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.PRNGKey(0))
  assert params["rope_periods"].shape == (cfg.head_dim // 4,) and "pos_embed" not in params
  out = jax.eval_shape(lambda p: models.encode(p, jnp.zeros((1, 48, 32, 3)), cfg), params)
  assert out.patch_tokens.shape == (1, 3, 2, cfg.dim) and out.registers.shape == (1, 4, cfg.dim)
  assert out.cls_attention.shape == (1, cfg.num_heads, 3, 2)


def test_meta_pth_with_bfloat16_periods_converts_and_round_trips(tmp_path):
  """A .pth as Meta releases it (periods a bfloat16 tensor), read by the restricted unpickler, then saved."""
  model, memory, _ = _case(SMALL)
  meta, periods = _meta_case(model, memory)
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in meta.items()}
  tensors["rope_embed.periods"] = torch.from_numpy(periods).to(torch.bfloat16)
  torch.save(tensors, tmp_path / "dinov3.pth")
  params = models.convert_file(tmp_path / "dinov3.pth", SMALL)  # names told apart by their keys
  np.testing.assert_array_equal(params["rope_periods"], periods)
  jax.tree.map(np.testing.assert_array_equal, params, models.meta_to_params(meta, SMALL))
  models.save_params(tmp_path / "converted.safetensors", params, SMALL)
  again = models.convert_file(tmp_path / "converted.safetensors", SMALL)
  jax.tree.map(np.testing.assert_array_equal, again, params)
