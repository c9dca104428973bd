"""`Codec`: the public inference API for people who just want a codec.

    codec = Codec.from_safetensors('encoder.safetensors',
                                   'soundstream.safetensors')
    codes = codec.encode(wav, num_levels=codec.kbps_to_levels(6))
    out = codec.decode(codes)

Arrays in may be numpy or JAX; arrays out are numpy. Every method validates
its input and raises ValueError with a one-line reason for anything it cannot
treat correctly, rather than returning garbage.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib


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
    return cls(params, config)

  @classmethod
  def random(
    cls, config: codec_lib.CodecConfig | None = None, seed: int = 0
  ) -> 'Codec':
    """Untrained weights, for smoke tests and benchmarks."""
    config = config or codec_lib.production()
    return cls(codec_lib.init_params(config, jax.random.key(seed)), config)

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
    wav = _as_array(wav, 'wav')
    if wav.ndim != 3:
      raise ValueError(
        f'wav must be [batch, samples, channels], got {wav.shape}'
      )
    if wav.dtype != np.float32:
      raise ValueError(f'wav must be float32, got {wav.dtype}')
    if wav.shape[-1] not in (1, 2):
      raise ValueError(f'wav must have 1 or 2 channels, got {wav.shape[-1]}')
    if wav.shape[0] == 0 or wav.shape[1] == 0:
      raise ValueError(f'wav is empty: shape {wav.shape}')
    _check_finite(wav, 'wav')
    return wav

  def _check_levels(self, levels) -> int:
    if not isinstance(levels, (int, np.integer)) or not (
      1 <= levels <= self.num_levels
    ):
      raise ValueError(f'num_levels must be an int in 1..{self.num_levels}')
    return int(levels)

  def _check_codes(self, codes) -> np.ndarray:
    codes = _as_array(codes, 'codes')
    if codes.ndim != 3:
      raise ValueError(
        f'codes must be [batch, frames, levels], got {codes.shape}'
      )
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f'codes must be integers, got {codes.dtype}')
    if 0 in codes.shape:
      raise ValueError(f'codes are empty: shape {codes.shape}')
    self._check_levels(codes.shape[-1])
    k = self.config.quantizer.codebook_size
    if codes.min() < 0 or codes.max() >= k:
      raise ValueError(
        f'codes must lie in [0, {k}), got [{codes.min()}, {codes.max()}]'
      )
    return codes.astype(np.int32)

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


def _as_array(x, what: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except Exception as e:
    raise ValueError(f'{what} is not an array: {e}') from e


def _check_finite(x: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{what} contains NaN or Inf')
