"""`Codec`: the public inference API for people who just want a codec.

    codec = Codec.from_safetensors('encoder.safetensors',
                                   'soundstream.safetensors')
    codes = codec.encode(wav, num_levels=codec.kbps_to_levels(6))
    out = codec.decode(codes)

or, from a model directory written by `spectrostream-export` (or one that
holds just the two official files, read as the production preset):

    codec = Codec.load('my_model')
    out = codec.reconstruct(wav)  # same length as wav

Arrays in may be numpy or JAX; arrays out are numpy. Every method validates
its input and raises ValueError with a one-line reason for anything it cannot
treat correctly, rather than returning garbage.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import quantizer as rvq

# A model directory: the two official weight files plus this description.
CONFIG_FILE = 'config.json'
MODEL_FORMAT = 'spectrostream-model'
MODEL_FORMAT_VERSION = 1


class Codec:
  """A SpectroStream model with fixed parameters and jitted entry points."""

  def __init__(self, params, config: codec_lib.CodecConfig | None = None):
    self.config = config or codec_lib.production()
    expected = codec_lib.param_shapes(self.config)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    if got != want:
      raise ValueError('parameter tree does not match the config')
    self.params = jax.device_put(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    )
    self._model = codec_lib.SpectroStream(self.config)
    self._model_id = None

  @classmethod
  def from_safetensors(
    cls,
    encoder_path: str,
    soundstream_path: str,
    config: codec_lib.CodecConfig | None = None,
  ) -> 'Codec':
    """Loads the official two-file layout (production preset by default)."""
    config = config or codec_lib.production()
    params = weights.load_official(
      encoder_path, soundstream_path, codec_lib.param_shapes(config)
    )
    codec = cls(params, config)
    codec._model_id = files_model_id(encoder_path, soundstream_path)
    return codec

  @classmethod
  def load(cls, model_dir: str) -> 'Codec':
    """Loads a model directory (see docs/export.md).

    Without config.json the directory is the official release: the two
    weight files of the production preset. With it, its model_id must be
    the hash of the files, so stale or swapped weights are caught.
    """
    if not os.path.isdir(model_dir):
      raise ValueError(f'no such model directory: {model_dir}')
    paths = []
    for name in (weights.ENCODER_FILE, weights.SOUNDSTREAM_FILE):
      path = os.path.join(model_dir, name)
      if not os.path.isfile(path):
        raise ValueError(f'model directory {model_dir} lacks {name}')
      paths.append(path)
    config_path = os.path.join(model_dir, CONFIG_FILE)
    config, model_id = codec_lib.production(), None
    if os.path.exists(config_path):
      meta = read_model_config(config_path)
      config, model_id = meta['config'], meta['model_id']
    codec = cls.from_safetensors(*paths, config)
    if model_id is not None and model_id != codec.model_id:
      raise ValueError(
        f'{config_path} names model {model_id[:12]}... but the weights files '
        f'hash to {codec.model_id[:12]}...'
      )
    return codec

  @classmethod
  def random(
    cls, config: codec_lib.CodecConfig | None = None, seed: int = 0
  ) -> 'Codec':
    """Untrained weights, for smoke tests and benchmarks."""
    config = config or codec_lib.production()
    return cls(codec_lib.init_params(config, jax.random.key(seed)), config)

  @property
  def model_id(self) -> str:
    """Hex SHA-256 of the two official files (see `files_model_id`).

    For parameters that did not come from files, the hash of the files
    `weights.save_official` would write for them.
    """
    if self._model_id is None:
      files = official_file_bytes(self.params)
      digest = hashlib.sha256(files[weights.ENCODER_FILE])
      digest.update(files[weights.SOUNDSTREAM_FILE])
      self._model_id = digest.hexdigest()
    return self._model_id

  # Bitrate arithmetic -------------------------------------------------------

  @property
  def num_levels(self) -> int:
    return self.config.quantizer.num_levels

  @property
  def sample_rate(self) -> int:
    return self.config.sample_rate

  def kbps_to_levels(self, kbps: float) -> int:
    return self.config.levels_for_kbps(kbps)

  def levels_to_kbps(self, levels: int) -> float:
    return self.config.kbps_for_levels(levels)

  # Entry points ---------------------------------------------------------------

  def embed(self, wav) -> np.ndarray:
    """float32 [B, T, C] at 48 kHz -> float32 [B, ceil(T/1920), D]."""
    return np.asarray(self._embed(self.params, self._check_wav(wav)))

  def encode(self, wav, num_levels: int | None = None) -> np.ndarray:
    """float32 [B, T, C] -> int32 codes [B, ceil(T/1920), num_levels]."""
    levels = self._check_levels(
      self.num_levels if num_levels is None else num_levels
    )
    return np.asarray(self._encode(self.params, self._check_wav(wav), levels))

  def decode(self, codes) -> np.ndarray:
    """int codes [B, N, n] -> float32 [B, (N - 1)·1920, C], n levels used."""
    return np.asarray(self._decode(self.params, self._check_codes(codes)))

  def reconstruct(self, wav, num_levels: int | None = None) -> np.ndarray:
    """float32 [B, T, C] -> its reconstruction [B, T, config.num_channels].

    The input is zero-padded at the end to whole frames plus the decoder's
    look-ahead, so every input sample has its reconstruction.
    """
    wav = self._check_wav(wav)
    c = self.config
    t = wav.shape[1]
    frames = math.ceil(t / c.samples_per_frame) + c.lookahead
    pad = frames * c.samples_per_frame - t
    padded = np.pad(wav, ((0, 0), (0, pad), (0, 0)))
    return self.decode(self.encode(padded, num_levels))[:, :t]

  def decode_embeddings(self, emb) -> np.ndarray:
    """Continuous embeddings [B, N, D] -> waveform, without quantisation."""
    emb = _as_array(emb, 'embeddings')
    d = self.config.embedding_dim
    if emb.ndim != 3 or emb.shape[-1] != d or emb.dtype != np.float32:
      raise ValueError(
        f'embeddings must be float32 [B, N, {d}], got {emb.dtype} {emb.shape}'
      )
    _check_finite(emb, 'embeddings')
    return np.asarray(self._decode_emb(self.params, emb))

  # Validation ----------------------------------------------------------------

  def _check_wav(self, wav) -> np.ndarray:
    return check_audio(wav)

  def _check_levels(self, levels) -> int:
    return check_levels(levels, self.num_levels)

  def _check_codes(self, codes) -> np.ndarray:
    return check_codes(codes, self.config.quantizer)

  # Jitted functions (one compile per input shape) --------------------------

  @functools.cached_property
  def _embed(self):
    m = self._model
    return jax.jit(lambda p, x: m.apply({'params': p}, x, method=m.embed))

  @functools.cached_property
  def _encode(self):
    m = self._model
    return jax.jit(
      lambda p, x, n: m.apply({'params': p}, x, n, method=m.encode),
      static_argnums=2,
    )

  @functools.cached_property
  def _decode(self):
    m = self._model
    return jax.jit(lambda p, c: m.apply({'params': p}, c, method=m.decode))

  @functools.cached_property
  def _decode_emb(self):
    m = self._model
    return jax.jit(
      lambda p, e: m.apply({'params': p}, e, method=m.decode_embeddings)
    )


# Model directories --------------------------------------------------------


def files_model_id(encoder_path: str, soundstream_path: str) -> str:
  """Hex SHA-256 of encoder.safetensors' bytes then soundstream's bytes."""
  digest = hashlib.sha256()
  for path in (encoder_path, soundstream_path):
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


def official_file_bytes(params) -> dict[str, bytes]:
  """{file name: bytes} exactly as `weights.save_official` writes them."""
  per_file: dict[str, dict[str, np.ndarray]] = {}
  for model_path, value in weights.flatten(params).items():
    name, key = weights.official_key(model_path)
    per_file.setdefault(name, {})[key] = np.ascontiguousarray(value)
  return {
    name: safetensors.numpy.save(tensors, metadata={'format': 'flax'})
    for name, tensors in per_file.items()
  }


def config_to_dict(config: codec_lib.CodecConfig) -> dict[str, Any]:
  """The full config, quantizer included, as JSON-ready nested values."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(values: Any) -> codec_lib.CodecConfig:
  """Inverse of `config_to_dict`; fields it lacks keep their defaults."""
  return _dataclass_from_json(codec_lib.CodecConfig, values, 'codec_config')


def _dataclass_from_json(cls, values: Any, where: str):
  if not isinstance(values, dict):
    raise ValueError(f'{where} must be a JSON object')
  defaults = cls()
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f'{where} has unknown fields {unknown}')
  kwargs = {}
  for name, value in values.items():
    default = getattr(defaults, name)
    if dataclasses.is_dataclass(default):
      kwargs[name] = _dataclass_from_json(
        type(default), value, f'{where}.{name}'
      )
    else:
      kwargs[name] = _field_from_json(value, default, f'{where}.{name}')
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where} is not a valid config: {e}') from e


def _field_from_json(value: Any, default: Any, where: str) -> Any:
  """JSON lists back to (nested) int tuples; type-checked by the default."""
  if isinstance(value, list):
    value = _int_tuple(value, where)
  # A None default (e.g. dropout_levels) stands for an optional tuple.
  kind = tuple if default is None else type(default)
  if value is None and default is None:
    return value
  if kind is float and type(value) is int:
    return float(value)
  if type(value) is not kind:
    raise ValueError(
      f'{where} must be {kind.__name__}, got {type(value).__name__}'
    )
  return value


def _int_tuple(value: list, where: str) -> tuple:
  out = []
  for v in value:
    if isinstance(v, list):
      out.append(_int_tuple(v, where))
    elif type(v) is int:
      out.append(v)
    else:
      raise ValueError(f'{where} must hold integers, got {v!r}')
  return tuple(out)


def read_model_config(path: str) -> dict[str, Any]:
  """config.json -> its fields, with 'config' the rebuilt CodecConfig."""
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not readable JSON: {e}') from e
  if not isinstance(meta, dict) or meta.get('format') != MODEL_FORMAT:
    raise ValueError(f'{path} is not a {MODEL_FORMAT} config')
  version = meta.get('format_version')
  if version != MODEL_FORMAT_VERSION:
    raise ValueError(
      f'{path} has format_version {version!r}; this library reads '
      f'{MODEL_FORMAT_VERSION}'
    )
  model_id = meta.get('model_id')
  if not (isinstance(model_id, str) and len(model_id) == 64):
    raise ValueError(f'{path}: model_id must be a hex SHA-256')
  try:
    config = config_from_dict(meta.get('codec_config'))
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  return {**meta, 'config': config}


def model_config(
  config: codec_lib.CodecConfig, model_id: str, step: int | None
) -> dict[str, Any]:
  """The contents of config.json for a model with these weights."""
  preset = next(
    (name for name, make in codec_lib.PRESETS.items() if make() == config),
    None,
  )
  return {
    'format': MODEL_FORMAT,
    'format_version': MODEL_FORMAT_VERSION,
    'preset': preset,
    'model_id': model_id,
    'step': step,
    'sample_rate': config.sample_rate,
    'num_channels': config.num_channels,
    'samples_per_frame': config.samples_per_frame,
    'frame_rate': config.frame_rate,
    'num_levels': config.quantizer.num_levels,
    'codebook_size': config.quantizer.codebook_size,
    'kbps_per_level': config.kbps_per_level,
    'lookahead': config.lookahead,
    'codec_config': config_to_dict(config),
  }


def check_audio(wav, allow_empty: bool = False) -> np.ndarray:
  """float32 [B, T, 1 or 2], finite; ValueError with the reason otherwise."""
  wav = _as_array(wav, 'wav')
  if wav.ndim != 3:
    raise ValueError(f'wav must be [batch, samples, channels], got {wav.shape}')
  if wav.dtype != np.float32:
    raise ValueError(f'wav must be float32, got {wav.dtype}')
  if wav.shape[-1] not in (1, 2):
    raise ValueError(f'wav must have 1 or 2 channels, got {wav.shape[-1]}')
  if not allow_empty and (wav.shape[0] == 0 or wav.shape[1] == 0):
    raise ValueError(f'wav is empty: shape {wav.shape}')
  _check_finite(wav, 'wav')
  return wav


def check_levels(levels, num_levels: int) -> int:
  if not isinstance(levels, (int, np.integer)) or not (
    1 <= levels <= num_levels
  ):
    raise ValueError(f'num_levels must be an int in 1..{num_levels}')
  return int(levels)


def check_codes(
  codes, quantizer: rvq.QuantizerConfig, allow_empty: bool = False
) -> np.ndarray:
  """int [B, N, levels] codes in range, as int32; ValueError otherwise."""
  codes = _as_array(codes, 'codes')
  if codes.ndim != 3:
    raise ValueError(
      f'codes must be [batch, frames, levels], got {codes.shape}'
    )
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f'codes must be integers, got {codes.dtype}')
  if 0 in codes.shape and not (allow_empty and codes.shape[2]):
    raise ValueError(f'codes are empty: shape {codes.shape}')
  check_levels(codes.shape[-1], quantizer.num_levels)
  k = quantizer.codebook_size
  if codes.size and (codes.min() < 0 or codes.max() >= k):
    raise ValueError(
      f'codes must lie in [0, {k}), got [{codes.min()}, {codes.max()}]'
    )
  return codes.astype(np.int32)


def _as_array(x, what: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except Exception as e:
    raise ValueError(f'{what} is not an array: {e}') from e


def _check_finite(x: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{what} contains NaN or Inf')
