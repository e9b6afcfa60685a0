"""Demo: segment the photographs that ship with scikit-image and write a gallery.

Run:
  python -m experiments.segment --config=configs/demo.py --workdir=/tmp/jaxseg_demo

No ground truth, so no mIoU: metrics.json holds the foreground statistics and the
timings. With --config.model.weights=random nothing is downloaded (a smoke run whose
masks are meaningless). Runtime: about a minute on a laptop CPU.
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
