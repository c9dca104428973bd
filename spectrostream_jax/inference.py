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

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import checks
from spectrostream_jax import model_dir as model_dir_lib
from spectrostream_jax import streaming
from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib


class Codec:
  """A SpectroStream model with fixed parameters and jitted entry points."""

  def __init__(
    self,
    params,
    config: codec_lib.CodecConfig | None = None,
    codes_compatible_with: str | None = None,
  ):
    self.config = config or codec_lib.production()
    # The model whose codes this one shares (a decoder fine-tune's source,
    # docs/finetune.md); None when its codes are its own.
    self.codes_compatible_with = codes_compatible_with
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
    codec._model_id = model_dir_lib.files_model_id(
      encoder_path, soundstream_path
    )
    return codec

  @classmethod
  def load(cls, model_dir: str) -> 'Codec':
    """Loads a model directory (see docs/export.md).

    Without config.json the directory is the official release: the two
    weight files of the production preset. With it, its model_id must be
    the hash of the files, so stale or swapped weights are caught.
    """
    found = model_dir_lib.locate(model_dir)
    codec = cls.from_safetensors(
      found.encoder_path, found.soundstream_path, found.config
    )
    if found.model_id is not None and found.model_id != codec.model_id:
      raise ValueError(
        f'{os.path.join(model_dir, model_dir_lib.CONFIG_FILE)} names model '
        f'{found.model_id[:12]}... but the weights files hash to '
        f'{codec.model_id[:12]}...'
      )
    codec.codes_compatible_with = found.codes_compatible_with
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
    """Hex SHA-256 of the two official files (docs/export.md).

    For parameters that did not come from files, the hash of the files
    `weights.save_official` would write for them.
    """
    if self._model_id is None:
      self._model_id = model_dir_lib.params_model_id(self.params)
    return self._model_id

  @property
  def codes_id(self) -> str:
    """The model whose codes this one makes and reads (.sps headers)."""
    return self.codes_compatible_with or self.model_id

  def reads_codes_of(self, model_id: str) -> bool:
    """Can this model decode codes made by the model `model_id`?

    Its own, and those of every model sharing its encoder and codebooks
    (the source of a decoder fine-tune, and that source's other
    decoder fine-tunes).
    """
    return model_id in (self.model_id, self.codes_id)

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
    emb = checks.check_embeddings(emb, self.config.embedding_dim)
    return np.asarray(self._decode_emb(self.params, emb))

  # Validation ----------------------------------------------------------------

  def _check_wav(self, wav) -> np.ndarray:
    return checks.check_audio(wav)

  def _check_levels(self, levels) -> int:
    return checks.check_levels(levels, self.num_levels)

  def _check_codes(self, codes) -> np.ndarray:
    return checks.check_codes(codes, self.config.quantizer)

  # Jitted functions (one compile per input shape) --------------------------

  @functools.cached_property
  def streaming_weights(self) -> dict:
    """`streaming.prepare_weights` of this codec, shared by its streams."""
    return streaming.prepare_weights(self.config, self.params)

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
