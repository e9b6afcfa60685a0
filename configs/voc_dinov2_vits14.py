"""PASCAL VOC 2012 val (1,449 images, 21 classes) with DINOv2 ViT-S/14 at 448.

Run:
  python -m experiments.segment --config=configs/voc_dinov2_vits14.py --workdir=/tmp/jaxseg_voc_dinov2_vits14

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights
(downloaded on first use into ~/.cache/jaxseg).
"""

from configs import _base


def get_config():
  return _base.get_dataset_config("dinov2_vits14", "voc_seg", 20)
