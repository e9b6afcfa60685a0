"""Official DINO / DINOv2 / DINOv3 weights: where they live, downloading and caching, one loading entry point.

Downloads go to a temporary file next to the target, are checked against the server's size (and
sha256 where the Hub publishes it) and only then renamed into place, so an interrupted download
never leaves a file that looks complete. Converted parameters are cached once per variant/source.

DINOv3's Hub repositories are gated: the user's Hugging Face token ($HF_TOKEN, or the file
huggingface_hub's login writes) goes with requests to the Hub, and only there. Meta hands out its
own DINOv3 download URLs by e-mail, so the "meta" source has no URL: a downloaded .pth is used
as a local file.
"""

import dataclasses
import hashlib
import os
import pathlib
import urllib.error
import urllib.request
import warnings

import jax
import tqdm

from jaxseg._files import new_temp_file
from jaxseg.models.checkpoint import is_params_file, params_from_file, read_state_dict, save_params
from jaxseg.models.config import ViTConfig, get_variant
from jaxseg.models.convert import CheckpointError, guess_naming, hf_to_params, meta_to_params
from jaxseg.models.vit import Params, init_params

_META_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}{reg}_pretrain.pth"
_META_DINO = "https://dl.fbaipublicfiles.com/dino/{name}/{name}_pretrain.pth"
_HF = "{endpoint}/facebook/{repo}/resolve/main/{file}"
_HF_PAGE = "{endpoint}/facebook/{repo}"
_DINOV3_META_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
_DINOV2_SIZES = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}
_DINO_META_NAMES = {"dino_vits16": "dino_deitsmall16", "dino_vits8": "dino_deitsmall8",
                    "dino_vitb16": "dino_vitbase16", "dino_vitb8": "dino_vitbase8"}


class WeightsUnavailableError(RuntimeError):
  """Weights could not be downloaded; the message names the URLs and where to put a file by hand."""


class _Refused(WeightsUnavailableError):
  """The server answered 401 or 403: the repository is gated and the request had no (granted) token."""


class _NotOnServer(WeightsUnavailableError):
  """The server answered 404: the repository holds no such file (try the next candidate)."""


def default_cache_dir() -> pathlib.Path:
  """$JAXSEG_CACHE, else ~/.cache/jaxseg."""
  return pathlib.Path(os.environ.get("JAXSEG_CACHE", pathlib.Path.home() / ".cache" / "jaxseg"))


def hf_endpoint() -> str:
  """$HF_ENDPOINT (a Hub mirror, as huggingface_hub reads it), else https://huggingface.co."""
  return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_token() -> str | None:
  """The user's Hugging Face token: $HF_TOKEN, else the file of $HF_TOKEN_PATH, $HF_HOME/token or
  ~/.cache/huggingface/token (where `huggingface-cli login` writes it); None when there is none."""
  token = os.environ.get("HF_TOKEN", "").strip()
  if token:
    return token
  hf_home = pathlib.Path(os.environ.get("HF_HOME", pathlib.Path.home() / ".cache" / "huggingface"))
  path = pathlib.Path(os.environ.get("HF_TOKEN_PATH", hf_home / "token"))
  try:
    return path.read_text().strip() or None
  except OSError:
    return None


def _hf_repo(variant: str) -> str:
  """The Hub repository (under facebook/) of a variant."""
  if variant.startswith("dinov3_"):
    arch, _, data = variant[len("dinov3_"):].partition("_")
    return f"dinov3-{arch}-pretrain-{'sat493m' if data == 'sat' else 'lvd1689m'}"
  if variant.startswith("dinov2_"):
    family = "dinov2-with-registers" if variant.endswith("_reg") else "dinov2"
    return f"{family}-{_DINOV2_SIZES[variant.split('_')[1]]}"
  return variant.replace("_", "-")


def weights_urls(variant: str, source: str) -> tuple[str, ...]:
  """Download URLs of a variant's checkpoint, preferred first.

  source "meta": the facebookresearch .pth. source "hf": the Hub repo's model.safetensors, then its
  pytorch_model.bin (read through the restricted unpickler) for repos that hold only that.

  Raises:
    WeightsUnavailableError: DINOv3 from "meta", whose URLs Meta e-mails on request.
  """
  get_variant(variant)
  if source == "meta" and variant.startswith("dinov3_"):
    raise WeightsUnavailableError(
        f"DINOv3 weights from Meta come from download URLs e-mailed on request at {_DINOV3_META_PAGE}; "
        f"download the {variant} .pth and pass it as --config.model.weights=/path/file.pth, or use "
        f"--config.model.weights=hf (the gated {_HF_PAGE.format(endpoint=hf_endpoint(), repo=_hf_repo(variant))})")
  if source == "meta":
    if variant.startswith("dinov2_"):
      arch = variant.split("_")[1]
      return (_META_DINOV2.format(name=f"dinov2_{arch}", reg="_reg4" if variant.endswith("_reg") else ""),)
    return (_META_DINO.format(name=_DINO_META_NAMES[variant]),)
  if source == "hf":
    return tuple(_HF.format(endpoint=hf_endpoint(), repo=_hf_repo(variant), file=name)
                 for name in ("model.safetensors", "pytorch_model.bin"))
  raise ValueError(f"Unknown weights source {source!r}; choose 'hf' or 'meta'.")


def weights_url(variant: str, source: str) -> str:
  """The preferred download URL of a variant's checkpoint (the first of weights_urls)."""
  return weights_urls(variant, source)[0]


def _download_paths(variant: str, source: str, cache_dir: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """(url, cache path) of every candidate, preferred first."""
  return [(url, cache_dir / "downloads" / source / variant / url.rsplit("/", 1)[1])
          for url in weights_urls(variant, source)]


def download(url: str, path: pathlib.Path, token: str | None = None) -> pathlib.Path:
  """Downloads url to path (temp file + rename, the umask's mode) with a progress bar and a size / sha256 check.

  token, when given, is sent as `Authorization: Bearer <token>` (gated Hub repositories).

  Raises:
    WeightsUnavailableError: offline, the server refused, or the download is incomplete (names url).
  """
  request = urllib.request.Request(url)
  if token is not None:  # unredirected: the Hub redirects file downloads to a CDN that must not see it
    request.add_unredirected_header("Authorization", f"Bearer {token}")
  try:
    response = urllib.request.urlopen(request, timeout=60)
  except urllib.error.HTTPError as e:
    kind = {404: _NotOnServer, 401: _Refused, 403: _Refused}.get(e.code, WeightsUnavailableError)
    raise kind(f"Could not download {url} ({e})") from e
  except (urllib.error.URLError, OSError) as e:
    raise WeightsUnavailableError(f"Could not download {url} ({e})") from e
  path.parent.mkdir(parents=True, exist_ok=True)
  expected_size = int(response.headers.get("Content-Length") or -1)
  expected_sha = (response.headers.get("X-Linked-ETag") or "").strip('"')  # the Hub's sha256 of LFS files
  fd, tmp = new_temp_file(path, ".part")
  sha, size = hashlib.sha256(), 0
  try:
    with response, os.fdopen(fd, "wb") as out, tqdm.tqdm(total=max(expected_size, 0) or None, unit="B",
                                                         unit_scale=True, desc=path.name) as bar:
      while chunk := response.read(1 << 20):
        out.write(chunk)
        sha.update(chunk)
        size += len(chunk)
        bar.update(len(chunk))
    if expected_size >= 0 and size != expected_size:
      raise WeightsUnavailableError(f"Download of {url} is truncated ({size} of {expected_size} bytes)")
    if len(expected_sha) == 64 and sha.hexdigest() != expected_sha:
      raise WeightsUnavailableError(f"Download of {url} has sha256 {sha.hexdigest()}, expected {expected_sha}")
    os.replace(tmp, path)
  except (urllib.error.URLError, OSError) as e:
    raise WeightsUnavailableError(f"Download of {url} failed ({e})") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def fetch_checkpoint(variant: str, source: str, cache_dir: pathlib.Path) -> pathlib.Path:
  """The cached checkpoint file of a variant, downloading the first candidate the server has.

  Raises:
    WeightsUnavailableError: one line naming every candidate URL, where to put one by hand, and
      the offline smoke run (--config.model.weights=random).
  """
  candidates = _download_paths(variant, source, cache_dir)
  for _, path in candidates:
    if path.exists():
      return path
  hint = ("Download " + " or ".join(f"{url} to {path}" for url, path in candidates) +
          " by hand (the first present is used), or run offline with random weights (a smoke run, meaningless "
          "masks): --config.model.weights=random")
  missing = []
  token = hf_token() if source == "hf" else None
  for url, path in candidates:
    try:
      return download(url, path, token)
    except _NotOnServer:
      missing.append(url)
    except _Refused as e:
      page = _HF_PAGE.format(endpoint=hf_endpoint(), repo=_hf_repo(variant))
      raise WeightsUnavailableError(
          f"{e}: {page} is gated. Request access on that page, then set HF_TOKEN to a token of the account "
          f"granted access ({'the token sent was refused' if token else 'no token was found'}); or put a "
          f"checkpoint you have as {path}, or pass a local file as --config.model.weights=/path/file "
          f"(a .safetensors from the Hub or Meta's e-mailed .pth)") from e
    except WeightsUnavailableError as e:
      raise WeightsUnavailableError(f"{e}. {hint}.") from e
  raise WeightsUnavailableError(f"None of {missing} is on the server. {hint}.")


def convert_file(path: str | os.PathLike, cfg: ViTConfig, source: str = "auto") -> Params:
  """Converts a checkpoint file (.safetensors, .pth, .bin) with transformers ("hf") or official ("meta") names.

  Raises:
    ValueError (CheckpointError for keys and shapes): "<path>: <what is wrong>".
  """
  state_dict, metadata = read_state_dict(path)
  if is_params_file(metadata):
    params, stored = params_from_file(state_dict, metadata, str(path))
    if dataclasses.replace(stored, pos_interp=cfg.pos_interp) != cfg:
      raise ValueError(f"{path}: converted for {stored}, not {cfg}.")
    return params
  if source not in ("hf", "meta", "auto"):
    raise ValueError(f"Unknown checkpoint naming {source!r}; choose 'hf', 'meta' or 'auto'.")
  try:
    naming = guess_naming(state_dict) if source == "auto" else source
    return (hf_to_params if naming == "hf" else meta_to_params)(state_dict, cfg)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None


def load_pretrained(variant: str, source: str = "hf", cache_dir: str | os.PathLike | None = None) -> Params:
  """Official weights of a variant as jaxseg parameters, downloaded and converted on first use.

  Args:
    variant: a key of VARIANTS, e.g. "dinov2_vits14".
    source: "hf" (the Hugging Face Hub) or "meta" (dl.fbaipublicfiles.com).
    cache_dir: cache root (default $JAXSEG_CACHE or ~/.cache/jaxseg); the checkpoint goes to
      <cache>/downloads/<source>/<variant>/<file> (for "hf" model.safetensors, or pytorch_model.bin
      where the repository has no safetensors), the converted params to
      <cache>/converted/<variant>-<source>.safetensors.

  Raises:
    WeightsUnavailableError: offline or the download failed; names the URLs and the paths to fill by hand.
  """
  cfg = get_variant(variant)
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  converted = cache / "converted" / f"{variant}-{source}.safetensors"
  if converted.exists():
    tensors, metadata = read_state_dict(converted)
    return params_from_file(tensors, metadata, str(converted))[0]
  params = convert_file(fetch_checkpoint(variant, source, cache), cfg, source)
  save_params(converted, params, cfg)
  return params


def load_params(weights: str, variant: str, *, seed: int = 0,
                cache_dir: str | os.PathLike | None = None) -> tuple[Params, ViTConfig]:
  """The runners' one entry point for weights.

  Args:
    weights: "hf" or "meta" (official weights, see load_pretrained), "random" (init_params from
      PRNGKey(seed): a smoke run; warns with a UserWarning that the masks are meaningless), or a local file: .safetensors / .pth / .bin with transformers or
      official names (told apart by their keys) or a file written by save_params.
    variant: a key of VARIANTS.
    seed: PRNG seed for "random".
    cache_dir: cache root for "hf" / "meta".

  Returns:
    (params, cfg) with cfg = VARIANTS[variant].
  """
  cfg = get_variant(variant)
  if weights == "random":
    warnings.warn(f"load_params: weights='random' gives a randomly initialised {variant}: its features, masks "
                  "and scores are meaningless (a smoke run); use 'hf' or 'meta' for the released weights",
                  UserWarning, stacklevel=2)
    return init_params(cfg, jax.random.PRNGKey(seed)), cfg
  if weights in ("hf", "meta"):
    return load_pretrained(variant, weights, cache_dir), cfg
  if not os.path.exists(weights):
    raise FileNotFoundError(f"weights={weights!r} is neither 'hf', 'meta', 'random' nor an existing file.")
  return convert_file(weights, cfg), cfg
