"""Demo: segment the photographs that ship with scikit-image and write a gallery.

Run:
  python -m experiments.segment --config=configs/demo.py --workdir=/tmp/jaxseg_demo

No ground truth, so no mIoU: metrics.json holds the foreground statistics and the
timings. With --config.model.weights=random nothing is downloaded (a smoke run whose
masks are meaningless). Runtime, measured cold (new workdir, empty XLA cache, weights
download not included) with --config.model.weights=random on 2 CPU cores: 1 min 41 s wall
for the 6 photos (load average 2.4 rising to 7 from other jobs on the machine), 2.2 GB
peak memory; refinement (CRF compilation, 2 size buckets) 40 s, features 18 s, descriptors
16 s. A second run (new workdir) with the XLA cache warm (--xla_cache_dir, 1.5 MB after the
first run) took 54 s (refinement 14 s) at load average 6.
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
