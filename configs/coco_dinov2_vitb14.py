"""MS COCO 2017 val (5,000 images, 81 classes) with DINOv2 ViT-B/14 at 448.

Run:
  python -m experiments.segment --config=configs/coco_dinov2_vitb14.py --workdir=/tmp/jaxseg_coco_dinov2_vitb14

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights
(downloaded on first use into ~/.cache/jaxseg).
"""

from configs import _base


def get_config():
  return _base.get_dataset_config("dinov2_vitb14", "coco_object", 80)
