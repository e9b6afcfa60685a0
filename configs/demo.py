"""Demo: segment the photographs that ship with scikit-image.

Run:
  python -m experiments.segment --config=configs/demo.py --workdir=/tmp/jaxseg_demo

With `--config.model.weights=random` it needs no download (the segmentation is then
meaningless, a smoke run). Override any field with --config.FIELD=VALUE.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.variant = "dinov2_vits14"
  config.model.weights = "hf"  # "hf", "meta", a file path, or "random" (smoke runs only)

  config.data = ml_collections.ConfigDict()
  config.data.name = "skimage"  # photographs bundled with scikit-image
  config.data.split = "all"
  config.data.data_dir = ""
  config.data.manual_dir = ""
  config.data.limit = 0  # 0 = every image

  config.image_size = 448
  config.batch_size = 4
  return config
