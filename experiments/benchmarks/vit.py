"""ViT forward pass: jaxseg.models.encode against transformers' Dinov2Model and DINOv3ViTModel.

DINOv2 ViT-S/14 and DINOv3 ViT-S/16 (random weights) at 448x448, batch 8, float32 on CPU; jaxseg jitted and warmed up,
torch under no_grad with its default (SDPA) attention and as many threads as there are cores,
which is what XLA's CPU backend uses. Timed calls alternate between the two; the row gives the
best seconds per batch of each, images/s and the throughput ratio (reference s / jaxseg s).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from experiments.benchmarks.common import best_time
from experiments.benchmarks.common import row
from jaxseg import models

BATCH = 8
SIZE = 448
REPEAT = 3


def _pair(name: str, model: torch.nn.Module, cfg: models.ViTConfig) -> None:
  """One row: encode of cfg with model's weights against model itself, on the same random batch."""
  threads = os.cpu_count()
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  params = jax.device_put(models.hf_to_params(state_dict, cfg))
  images = np.random.default_rng(0).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  images_device = jnp.asarray(images)
  images_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

  encode = jax.jit(models.encode, static_argnames=("cfg", "dtype", "return_blocks"))

  def jaxseg():
    encode(params, images_device, cfg).patch_tokens.block_until_ready()

  def reference():
    with torch.no_grad():
      model(images_torch)

  # Alternate single timed calls so that load from other processes hits both sides alike.
  jax_s = best_time(jaxseg, repeat=1, warmup=1)
  ref_s = best_time(reference, repeat=1, warmup=1)
  for _ in range(REPEAT - 1):
    jax_s = min(jax_s, best_time(jaxseg, repeat=1, warmup=0))
    ref_s = min(ref_s, best_time(reference, repeat=1, warmup=0))
  row(f"vit {name} {SIZE}x{SIZE} batch {BATCH} (s/batch)", jax_s, ref_s,
      extra=f"images/s jaxseg {BATCH / jax_s:.2f} reference {BATCH / ref_s:.2f}  throughput x{ref_s / jax_s:.2f}  "
            f"threads {threads}, backend {jax.default_backend()}")


def run() -> None:
  torch.set_num_threads(os.cpu_count())
  dinov2 = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                     patch_size=14)
  _pair("dinov2_vits14", transformers.Dinov2Model(dinov2).eval(), models.VARIANTS["dinov2_vits14"])
  # transformers' defaults are the released ViT-S/16 (4 registers, RoPE base 100, eps 1e-5).
  dinov3 = transformers.DINOv3ViTConfig(num_register_tokens=4)
  _pair("dinov3_vits16", transformers.DINOv3ViTModel(dinov3).eval(), models.VARIANTS["dinov3_vits16"])
