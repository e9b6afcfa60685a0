"""Reading checkpoint files without running pickled code, and the converted-params file format.

.safetensors is parsed directly (bfloat16 included). PyTorch .pth/.bin zip archives go through
an unpickler that only knows how to rebuild tensors and ordered dicts: any other global (e.g.
os.system in a malicious pickle) is refused before it can be called. torch is never imported.
Converted parameters are stored as safetensors with '/'-joined names and the ViTConfig in the
metadata, written atomically.
"""

import collections
import dataclasses
import json
import math
import os
import pathlib
import pickle
import struct
import zipfile
import zlib
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

from jaxseg._files import new_temp_file, umask_mode
from jaxseg.models.config import ViTConfig
from jaxseg.models.vit import Params

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
PARAMS_FORMAT = "jaxseg-vit-params"


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Returns ({name: array}, metadata) of a .safetensors file; bfloat16 arrays use ml_dtypes.

  Raises:
    ValueError: "<path>: <what is wrong>" for an empty, truncated or foreign file.
  """
  path = str(path)
  size = os.path.getsize(path)
  if size < 8:
    raise ValueError(f"{path}: {size} bytes, too short for a safetensors file (empty or truncated download?)")
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
      raise ValueError(f"{path}: not a whole safetensors file (its header claims {header_len} bytes, the file has "
                       f"{size}): truncated, or not safetensors")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
      raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    data = f.read()
  if not isinstance(header, dict):
    raise ValueError(f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, not an object)")
  metadata = header.pop("__metadata__", {}) or {}
  tensors = {}
  for name, info in header.items():
    try:
      dtype, shape, (start, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: header entry {name!r} is not a tensor description") from None
    if dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}.")
    needed = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
    if not 0 <= start <= end <= len(data) or end - start != needed:
      raise ValueError(f"{path}: tensor {name!r} {dtype}{list(shape)} needs {needed} bytes at [{start}, {end}) of a "
                       f"{len(data)}-byte data section: truncated or damaged file")
    tensors[name] = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[dtype]).reshape(shape)
  return tensors, metadata


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


class _DamagedArchive(Exception):
  """A torch.save archive whose parts do not fit together; read_torch names the file."""


class RefusedPickleError(pickle.UnpicklingError, ValueError):
  """A checkpoint's pickle asks for a global other than tensors and dicts (maybe code to run)."""


def _rebuild_tensor(storage, offset, size, stride, *unused):
  # Bounds first: as_strided would read past a short storage.
  extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
  if offset < 0 or extent > storage.shape[0]:
    raise _DamagedArchive(f"a tensor of shape {tuple(size)} lies past the end of its {storage.shape[0]}-element "
                          "storage")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


class _TensorUnpickler(pickle.Unpickler):
  """Unpickler for torch.save's data.pkl that can only produce arrays, dicts and plain values."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages = {}

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return _StorageType(_TORCH_STORAGES[name])
    raise RefusedPickleError(
        f"{self._path}: refusing to load global {module}.{name}; only tensors and dicts are read from "
        "checkpoints (no pickled code is run).")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise _DamagedArchive(f"unsupported persistent id {pid!r}")
    key = str(pid[2])
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, pid[1].dtype)
    return self._storages[key]


def read_torch(path: str | os.PathLike) -> dict[str, Any]:
  """Loads a torch.save zip archive (.pth / .bin) as nested dicts of numpy arrays, running no pickled code.

  Raises:
    RefusedPickleError: the pickle asks for any other global (e.g. os.system).
    ValueError: "<path>: <what is wrong>" for an empty, truncated, legacy or foreign file.
  """
  path = str(path)
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(4)
    if not head:
      raise ValueError(f"{path}: empty file (an interrupted download?)")
    if head.startswith(b"PK\x03\x04"):
      raise ValueError(f"{path}: truncated or damaged zip archive (no central directory): download or save it again")
    if head[:1] == b"\x80":  # the pickle protocol opcode
      raise ValueError(f"{path}: a legacy or plain pickle, not a torch.save zip archive (refused; re-save it with a "
                       "current torch.save, or convert it to .safetensors)")
    raise ValueError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
      if len(pickles) != 1:
        raise _DamagedArchive(f"expected one data.pkl in the archive, found {pickles}")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder = f"{prefix}byteorder"
      if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise _DamagedArchive("big-endian checkpoints are not supported")
      with archive.open(pickles[0]) as f:
        return _TensorUnpickler(f, archive, prefix, path).load()
  except RefusedPickleError:
    raise
  except (_DamagedArchive, zipfile.BadZipFile, KeyError, EOFError, ValueError, pickle.UnpicklingError,
          zlib.error) as e:
    raise ValueError(f"{path}: damaged torch.save archive ({e})") from None


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
  """Finds the state dict inside a training checkpoint ({'model': ...}, {'teacher': ...})."""
  for _ in range(3):
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
      return dict(obj)
    if isinstance(obj, dict):
      inner = next((obj[k] for k in ("state_dict", "model", "teacher", "module") if isinstance(obj.get(k), dict)),
                   None)
      if inner is not None:
        obj = inner
        continue
    break
  raise ValueError(f"{path}: no state dict of tensors found (top-level keys: "
                   f"{list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}).")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({name: array}, metadata) from a .safetensors, .pth, .pt or .bin checkpoint."""
  path = str(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith((".pth", ".pt", ".bin")):
    return _unwrap(read_torch(path), path), {}
  raise ValueError(f"{path}: unknown checkpoint extension; expected .safetensors, .pth, .pt or .bin.")


def _flatten(params: Params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): np.ascontiguousarray(np.asarray(v, np.float32)) for path, v in flat}


def _unflatten(flat: dict[str, np.ndarray]) -> Params:
  params = {}
  for name, value in flat.items():
    node = params
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return params


def save_params(path: str | os.PathLike, params: Params, cfg: ViTConfig) -> None:
  """Writes converted parameters and their config to a .safetensors file, atomically, with the umask's mode."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  metadata = {"format": PARAMS_FORMAT, "config": json.dumps(dataclasses.asdict(cfg))}
  fd, tmp = new_temp_file(path)
  mode = umask_mode(fd)
  os.close(fd)
  try:
    safetensors.numpy.save_file(_flatten(params), tmp, metadata=metadata)  # recreates the file, mode 0600
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def params_from_file(tensors: dict[str, np.ndarray], metadata: dict[str, str], path: str) -> tuple[Params, ViTConfig]:
  """(params, cfg) from a file written by save_params (already read with read_safetensors)."""
  if metadata.get("format") != PARAMS_FORMAT:
    raise ValueError(f"{path}: not a jaxseg converted-params file (metadata format {metadata.get('format')!r}).")
  try:
    cfg = ViTConfig(**json.loads(metadata["config"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: converted-params file with a bad config in its metadata ({e})") from None
  return _unflatten(tensors), cfg


def is_params_file(metadata: dict[str, str]) -> bool:
  return metadata.get("format") == PARAMS_FORMAT
