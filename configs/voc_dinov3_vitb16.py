"""PASCAL VOC 2012 val (1,449 images, 21 classes) with DINOv3 ViT-B/16 (LVD-1689M) at 448 (a 28x28 patch grid).

Run:
  python -m experiments.segment --config=configs/voc_dinov3_vitb16.py --workdir=/tmp/jaxseg_voc_dinov3_vitb16

Dataset and weights as in configs/voc_dinov3_vits16.py; the gated Hub repository
here is facebook/dinov3-vitb16-pretrain-lvd1689m.
"""

from configs import _base


def get_config():
  return _base.get_dataset_config("dinov3_vitb16", "voc_seg", 20)
