"""PASCAL VOC 2012 val (1,449 images, 21 classes) with DINOv2 ViT-B/14 at 448.

Run:
  python -m experiments.segment --config=configs/voc_dinov2_vitb14.py --workdir=/tmp/jaxseg_voc_dinov2_vitb14

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights
(downloaded on first use into ~/.cache/jaxseg).
"""

from configs import _base


def get_config():
  config = _base.get_base_config()
  config.model.variant = "dinov2_vitb14"
  config.data.name = "voc_seg"
  config.data.split = "val"
  config.method.num_classes = 20
  config.method.num_categories = 20
  return config
