"""The run context every pass reads and writes through: config, data, devices, and fingerprinted files.

A pass's unit outputs (an .npz per chunk, a .png per image, a level file) carry the fingerprint they were
made under: npz files a `fingerprint` member, PNG files a text chunk. A unit is reused exactly when its
recorded fingerprint equals the one the current inputs give (`is_current`), so a resumed run never mixes
outputs of different inputs, whatever was killed when.
"""

import dataclasses
import functools
import hashlib
import json
import pathlib
import warnings
import zipfile

import jax
import ml_collections
import numpy as np
import PIL.Image

from experiments import common
from experiments import distributed
from jaxseg import models
from jaxseg import parallel
from jaxseg.framework import MethodConfig
from jaxseg.framework import PatchFeatures

FINGERPRINT = "fingerprint"  # npz member and PNG text key holding a unit's fingerprint
STATS = "jaxseg_stats"  # PNG text key of a refined mask's per-level pixel counts (JSON)


def digest(value) -> str:
  """A stable hex fingerprint of a JSON-serialisable value (dict keys sorted)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclasses.dataclass
class RunContext:
  """Everything the passes share. The engine fills `fingerprints` before a pass runs."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  method: MethodConfig  # effective: num_categories reduced to the split's image count
  source: object
  images: list[dict]  # per run image, in order: experiments/passes/source.py's entries
  vit: models.ViTConfig
  key: jax.Array  # jax.random.key(seed): the seed-dependent passes' keys derive from it
  mesh: jax.sharding.Mesh  # this process's devices; per-chunk work runs data-parallel over them
  process: tuple[int, int] = (0, 1)  # (index, count); process p owns the chunks c with c % count == p
  seed: int = 0  # the seed-dependent passes' seed (one of config.seeds); the weights' init uses config.seed
  shared: pathlib.Path | None = None  # with config.seeds: the run's workdir (features/), workdir = seeds/<seed>
  fingerprints: dict = dataclasses.field(default_factory=dict)  # pass name -> fingerprint
  field_digests: dict = dataclasses.field(default_factory=dict)  # pass name -> digest of its fields and code
  effective: dict = dataclasses.field(default_factory=dict)  # values used where the config asked for more
  timings: dict = dataclasses.field(default_factory=dict)  # pass name -> seconds (kept by the engine)
  _model: tuple | None = None

  # ---- the split and its chunks --------------------------------------------------------------------------

  @property
  def indices(self) -> np.ndarray:
    """[N] source indices of the run, in order."""
    return np.asarray([image["index"] for image in self.images], np.int64)

  @property
  def num_chunks(self) -> int:
    return -(-len(self.images) // self.config.batch_size)

  @property
  def is_main(self) -> bool:
    """Process 0 fits the dataset-wide levels and classes and writes the report."""
    return self.process[0] == 0

  @functools.cached_property
  def ids(self) -> dict[int, str]:
    """{source index: image id}."""
    return {image["index"]: image["id"] for image in self.images}

  def chunk(self, c: int) -> np.ndarray:
    b = self.config.batch_size
    return self.indices[c * b:(c + 1) * b]

  def owned(self) -> list[int]:
    """The chunks this process computes the per-chunk passes of."""
    index, count = self.process
    return list(range(index, self.num_chunks, count))

  def owned_indices(self) -> np.ndarray:
    owned = self.owned()
    return np.concatenate([self.chunk(c) for c in owned]) if owned else np.zeros(0, np.int64)

  def grid(self) -> tuple[int, int]:
    side = self.config.image_size // self.vit.patch_size
    return side, side

  def num_patches(self) -> int:
    h, w = self.grid()
    return len(self.images) * h * w

  def path(self, folder: str, c: int) -> pathlib.Path:
    base = self.shared if folder == "features" and self.shared is not None else self.workdir  # one cache per run
    return base / folder / f"{c:06d}.npz"

  def image_path(self, folder: str, image_id: str) -> pathlib.Path:
    return self.workdir / folder / f"{image_id}.png"

  def on_devices(self, batch):
    """A host batch (pytree of [B, ...] arrays) padded to a multiple of the devices and sharded over them."""
    return parallel.shard_batch(parallel.pad_batch(batch, self.mesh.size), self.mesh)

  def key_of(self, name: str) -> jax.Array:
    from jaxseg.framework import pass_key  # the same keys as framework.segment_features
    return pass_key(self.key, name)

  def params(self):
    """The ViT's parameters replicated over self.mesh, loaded (downloaded) once, on process 0 first.

    Only passes that run the ViT call it, so a relabelling run needs no weights.
    """
    if self._model is None:
      config = self.config
      with warnings.catch_warnings():  # the runner's banner already says it, louder, once
        warnings.filterwarnings("ignore", message="load_params: weights='random'")
        params, _ = distributed.main_first("weights", lambda: models.load_params(
            config.model.weights, config.model.variant, seed=config.seed, cache_dir=config.model.cache_dir or None))
      self._model = (parallel.replicate(params, self.mesh),)
    return self._model[0]

  # ---- fingerprinted files -------------------------------------------------------------------------------

  def unit_fingerprint(self, name: str, c: int | None = None) -> str:
    """The fingerprint a unit of pass `name` must carry; features chunks depend only on their own images."""
    if name == "features" and c is not None:
      b = self.config.batch_size
      return digest([self.field_digests[name], [image_identity(e) for e in self.images[c * b:(c + 1) * b]]])
    return self.fingerprints[name]

  def save_npz(self, name: str, path: pathlib.Path, c: int | None = None, **arrays) -> None:
    common.save_npz(path, **arrays, **{FINGERPRINT: np.asarray(self.unit_fingerprint(name, c))})

  def save_png(self, name: str, path: pathlib.Path, array: np.ndarray, palette=None, stats=None) -> None:
    """A uint8 [H, W] PNG (palette PNG with a palette) stamped with pass `name`'s fingerprint (and stats)."""
    text = {FINGERPRINT: self.unit_fingerprint(name)}
    if stats is not None:
      text[STATS] = json.dumps(stats)
    common.save_png(path, array, palette=palette, text=text)

  def is_current(self, name: str, path: pathlib.Path, c: int | None = None) -> bool:
    """Whether path exists and carries the fingerprint pass `name` gives it now."""
    return recorded_fingerprint(path) == self.unit_fingerprint(name, c)

  def todo(self, name: str, folder: str) -> list[int]:
    """This process's chunks whose file in folder is missing or not current."""
    return [c for c in self.owned() if not self.is_current(name, self.path(folder, c), c)]

  def load(self, path: pathlib.Path, *members: str) -> dict[str, np.ndarray]:
    """Only the named members of an npz file (np.load reads members lazily)."""
    with np.load(path, allow_pickle=False) as f:
      return {m: f[m] for m in members}

  def features(self, c: int, *members: str) -> tuple[PatchFeatures, dict]:
    """(chunk c's PatchFeatures padded and sharded over the mesh, the members as stored).

    Only `members` of patches/cls/attention are read; the others are zeros [B, 1] (no pass reads them).
    """
    arrays = self.load(self.path("features", c), "valid", "index", *members)
    b = len(arrays["valid"])
    fields = {name: arrays[name] if name in arrays else np.zeros((b, 1), np.float32)
              for name in ("patches", "cls", "attention")}
    if "patches" in arrays:
      fields["patches"] = arrays["patches"].astype(np.float32)
    return self.on_devices(PatchFeatures(valid=arrays["valid"], **fields)), arrays

  def feature_batches(self, *members: str):
    """A callable giving a fresh iterator of (first position, PatchFeatures) over the split (framework.compose's
    `batches`): chunk c's first image is at c * batch_size."""
    return lambda: ((c * self.config.batch_size, self.features(c, *members)[0]) for c in range(self.num_chunks))


def image_identity(entry: dict) -> dict:
  """What of an image's entry (experiments/passes/source.py) its features depend on: not its label, not the
  file's size and mtime (the cache key of its content hash)."""
  return {k: v for k, v in entry.items() if k not in ("file", "label")}


def recorded_fingerprint(path: pathlib.Path) -> str | None:
  """The fingerprint stamped in an npz or PNG file; None if it is missing, unstamped or unreadable."""
  try:
    if path.suffix == ".png":
      with PIL.Image.open(path) as image:
        return image.info.get(FINGERPRINT)
    with np.load(path, allow_pickle=False) as f:
      return str(f[FINGERPRINT]) if FINGERPRINT in f.files else None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a foreign or damaged file: not current
    return None


def png_stats(path: pathlib.Path) -> dict | None:
  """The stats stamped in a refined mask's PNG by save_png."""
  with PIL.Image.open(path) as image:
    text = image.info.get(STATS)
  return None if text is None else json.loads(text)
