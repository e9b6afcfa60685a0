r"""Convert a DINO / DINOv2 checkpoint into a jaxseg params file (safetensors with its config).

  python -m experiments.convert_weights --input=dinov2_vits14_pretrain.pth \
    --variant=dinov2_vits14 --output=/tmp/dinov2_vits14.safetensors

The input may be .safetensors, .pth or .bin with transformers or facebookresearch names
(--source=auto tells them apart by their keys); .pth/.bin files are read without running
pickled code. The output is written atomically and is accepted wherever weights are
(e.g. --config.model.weights=/tmp/dinov2_vits14.safetensors). A missing, truncated or foreign
input file ends with one line `error: ...` naming it, and exit status 2.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax

from experiments import errors
from jaxseg import models

_INPUT = flags.DEFINE_string("input", None, "Checkpoint file: .safetensors, .pth or .bin.")
_VARIANT = flags.DEFINE_enum("variant", None, sorted(models.VARIANTS), "Architecture of the checkpoint.")
_SOURCE = flags.DEFINE_enum("source", "auto", ["auto", "hf", "meta"], "Key naming: transformers, official, or guess.")
_OUTPUT = flags.DEFINE_string("output", None, "Converted params file to write (.safetensors).")
flags.mark_flags_as_required(["input", "variant", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not os.path.isfile(_INPUT.value):
    raise errors.UserError(f"--input={_INPUT.value}: no such file")
  cfg = models.VARIANTS[_VARIANT.value]
  params = models.convert_file(_INPUT.value, cfg, _SOURCE.value)
  models.save_params(_OUTPUT.value, params, cfg)
  logging.info("Wrote %s (%s, %d parameters).", _OUTPUT.value, _VARIANT.value,
               sum(p.size for p in jax.tree.leaves(params)))


if __name__ == "__main__":
  errors.run_main(main)
