"""PASCAL VOC 2012 val (1,449 images, 21 classes) with DINO ViT-S/8 at 448 (56x56 patches).

Run:
  python -m experiments.segment --config=configs/voc_dino_vits8.py --workdir=/tmp/jaxseg_voc_dino_vits8

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights
(downloaded on first use into ~/.cache/jaxseg).
"""

from configs import _base


def get_config():
  return _base.get_dataset_config("dino_vits8", "voc_seg", 20)
