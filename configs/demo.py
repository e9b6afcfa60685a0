"""Demo: segment the photographs that ship with scikit-image and write a gallery.

Run:
  python -m experiments.segment --config=configs/demo.py --workdir=/tmp/jaxseg_demo

No ground truth, so no mIoU: metrics.json holds the foreground statistics and the
timings. The real run downloads the DINOv2 ViT-S/14 weights on first use; with
--config.model.weights=random nothing is downloaded (the offline smoke run, whose masks
are meaningless). Runtime of that smoke run, cold (new workdir, empty XLA cache), measured
on 2026-12-07 on 2 quiet CPU cores (load average 0.4 before it): 42-44 s wall for the 6
photos, 1.2 GB peak memory.
"""

from configs import _base


def get_config():
  config = _base.get_base_config()
  config.data.name = "skimage"
  config.data.split = "all"
  config.data.data_dir = "~/.cache/jaxseg/data"
  config.batch_size = 4
  config.method.num_categories = 2
  config.method.num_classes = 3
  config.gallery_size = 16
  return config
