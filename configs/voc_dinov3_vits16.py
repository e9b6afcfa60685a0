"""PASCAL VOC 2012 val (1,449 images, 21 classes) with DINOv3 ViT-S/16 (LVD-1689M) at 448 (a 28x28 patch grid).

Run:
  python -m experiments.segment --config=configs/voc_dinov3_vits16.py --workdir=/tmp/jaxseg_voc_dinov3_vits16

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights: the
Hub repository facebook/dinov3-vits16-pretrain-lvd1689m is gated (request access on its
page, then set HF_TOKEN), or pass Meta's .pth as --config.model.weights=/path/file.pth.
DINOv3 weights are under Meta's DINOv3 License.
"""

from configs import _base


def get_config():
  return _base.get_dataset_config("dinov3_vits16", "voc_seg", 20)
