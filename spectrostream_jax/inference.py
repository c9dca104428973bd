"""`Codec`: the public inference API for people who just want a codec.

    codec = Codec.from_safetensors('encoder.safetensors',
                                   'soundstream.safetensors')
    codes = codec.encode(wav, num_levels=codec.kbps_to_levels(6))
    out = codec.decode(codes)

or, from a model directory written by `spectrostream-export` (or one that
holds just the two official files, read as the production preset):

    codec = Codec.load('my_model')
    out = codec.reconstruct(wav)  # same length as wav

    codes = codec.encode_file('song.flac')  # any rate: resampled to 48 kHz
    codec.decode_to_file(codes, 'song.wav')

Audio in is float [batch, samples, channels] (1 or 2 channels), 48 kHz
unless `sample_rate=` says otherwise, in which case it is resampled with
soxr (as the `spectrostream` command does); float64 (soundfile's default)
and float16 are cast to float32. Arrays in may be numpy or JAX; arrays out
are numpy. Every method validates its input and raises ValueError with a
one-line reason for anything it cannot treat correctly, rather than
returning garbage.

Products run in full float32 on every platform, so codes agree with a
CPU's and Google's; `precision='tensorfloat32'` or `'bfloat16'` trades
that for speed (docs/precision.md).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
import soxr

from spectrostream_jax import audio_formats
from spectrostream_jax import checks
from spectrostream_jax import files
from spectrostream_jax import model_dir as model_dir_lib
from spectrostream_jax import precision as precision_lib
from spectrostream_jax import signal
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
    precision: str = precision_lib.DEFAULT,
  ):
    self.config = config or codec_lib.production()
    # A `precision_lib.MODES` name, and the config the programs compute
    # with: the mode's dtype, not the one the model was trained in.
    self.precision = precision_lib.check(precision)
    self.compute_config = precision_lib.inference_config(
      self.config, self.precision
    )
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
    self._model = codec_lib.SpectroStream(self.compute_config)
    self._model_id = None

  @classmethod
  def from_safetensors(
    cls,
    encoder_path: str,
    soundstream_path: str,
    config: codec_lib.CodecConfig | None = None,
    precision: str = precision_lib.DEFAULT,
  ) -> 'Codec':
    """Loads the official two-file layout (production preset by default)."""
    config = config or codec_lib.production()
    params = weights.load_official(
      encoder_path, soundstream_path, codec_lib.param_shapes(config)
    )
    codec = cls(params, config, precision=precision)
    codec._model_id = model_dir_lib.files_model_id(
      encoder_path, soundstream_path
    )
    return codec

  @classmethod
  def load(
    cls, model_dir: str, precision: str = precision_lib.DEFAULT
  ) -> 'Codec':
    """Loads a model directory (see docs/export.md).

    Without config.json the directory is the official release: the two
    weight files of the production preset. With it, its model_id must be
    the hash of the files, so stale or swapped weights are caught.
    """
    found = model_dir_lib.locate(model_dir)
    codec = cls.from_safetensors(
      found.encoder_path, found.soundstream_path, found.config, precision
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
    cls,
    config: codec_lib.CodecConfig | None = None,
    seed: int = 0,
    precision: str = precision_lib.DEFAULT,
  ) -> 'Codec':
    """Untrained weights, for smoke tests and benchmarks."""
    config = config or codec_lib.production()
    params = codec_lib.init_params(config, jax.random.key(seed))
    return cls(params, config, precision=precision)

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

  def embed(self, wav, sample_rate: int | None = None) -> np.ndarray:
    """float [B, T, C] -> float32 [B, ceil(T'/1920), D] (T' at 48 kHz)."""
    wav = self._check_wav(wav, sample_rate)
    return np.asarray(self._embed(self.params, wav))

  def encode(
    self,
    wav,
    num_levels: int | None = None,
    sample_rate: int | None = None,
  ) -> np.ndarray:
    """float [B, T, C] -> int32 codes [B, ceil(T'/1920), num_levels].

    `sample_rate`: the rate of `wav`, resampled to the model's (48 kHz);
    None means `wav` is at the model's rate already: nothing can tell a
    44.1 kHz array from a 48 kHz one, so say so when it is not.
    """
    levels = self._check_levels(
      self.num_levels if num_levels is None else num_levels
    )
    wav = self._check_wav(wav, sample_rate)
    return np.asarray(self._encode(self.params, wav, levels))

  def decode(self, codes, sample_rate: int | None = None) -> np.ndarray:
    """int codes [B, N, n] -> float32 [B, (N - 1)·1920, C], n levels used.

    At the model's rate, or resampled to `sample_rate`.
    """
    out = np.asarray(self._decode(self.params, self._check_codes(codes)))
    return self._resample(out, self.sample_rate, sample_rate)

  def reconstruct(
    self,
    wav,
    num_levels: int | None = None,
    sample_rate: int | None = None,
  ) -> np.ndarray:
    """float [B, T, C] -> its reconstruction [B, T, config.num_channels].

    The input is zero-padded at the end to whole frames plus the decoder's
    look-ahead, so every input sample has its reconstruction. With
    `sample_rate` the codec runs at 48 kHz and the result comes back at
    `sample_rate`, T samples long.
    """
    t = np.shape(wav)[1] if np.ndim(wav) == 3 else 0
    wav = self._check_wav(wav, sample_rate)
    c = self.config
    frames = math.ceil(wav.shape[1] / c.samples_per_frame) + c.lookahead
    pad = frames * c.samples_per_frame - wav.shape[1]
    padded = np.pad(wav, ((0, 0), (0, pad), (0, 0)))
    out = self.decode(self.encode(padded, num_levels))
    if sample_rate is None or sample_rate == self.sample_rate:
      return out[:, :t]
    out = self._resample(out, self.sample_rate, sample_rate)
    return np.pad(out, ((0, 0), (0, max(0, t - out.shape[1])), (0, 0)))[:, :t]

  def reconstruct_levels(
    self, wav, levels
  ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """float [B, T, C] at the model's rate -> (codes, {n: reconstruction}).

    What `reconstruct(wav, n)` gives for each n, within float rounding,
    and the codes it decodes (those of wav zero-padded to whole frames),
    from two programs per length bucket instead of two per length and n:
    the input is zero-padded at the end to `signal.bucket` frames, encoded
    once and decoded at every n by one program (n is an argument, not a
    shape). The codec is causal, so the padding changes nothing before
    sample T. Codes [B, ceil(T/1920), max(levels)]; reconstructions [B, T,
    config.num_channels].
    """
    wav = self._check_wav(wav)
    levels = sorted({self._check_levels(n) for n in levels})
    t, per = wav.shape[1], self.config.samples_per_frame
    frames = math.ceil(t / per)
    padded_frames = signal.bucket(frames + self.config.lookahead)
    pad = padded_frames * per - t
    padded = np.pad(wav, ((0, 0), (0, pad), (0, 0)))
    codes = self._encode(self.params, padded, levels[-1])
    out = {
      n: np.asarray(self._decode_prefix(self.params, codes, n))[:, :t]
      for n in levels
    }
    return np.asarray(codes)[:, :frames], out

  def encode_file(self, path, num_levels: int | None = None) -> np.ndarray:
    """An audio file (any rate soundfile reads) -> codes [1, N, num_levels].

    Mono stays mono for the model to duplicate; the file is resampled to
    48 kHz. For a whole album, the `spectrostream` command streams.
    """
    try:
      wav, rate = sf.read(os.fspath(path), dtype='float32', always_2d=True)
    except (sf.SoundFileError, OSError, RuntimeError) as e:
      raise ValueError(f'cannot read {path}: {files.first_line(e)}') from e
    return self.encode(wav[None], num_levels, sample_rate=rate)

  def decode_to_file(
    self,
    codes,
    path,
    sample_rate: int | None = None,
    subtype: str | None = None,
  ) -> None:
    """Codes [1, N, n] or [N, n] -> an audio file, written whole or not at all.

    The format comes from the extension, as for `spectrostream decode`
    (`audio_formats`): float samples in WAV, AIFF and W64, PCM_24 in FLAC
    (clipped to ±1). At 48 kHz unless `sample_rate` is given.
    """
    codes = checks.as_array(codes, 'codes')
    if codes.ndim == 2:
      codes = codes[None]
    if codes.ndim == 3 and codes.shape[0] != 1:
      raise ValueError(
        f'decode_to_file writes one item; codes have batch {codes.shape[0]}'
      )
    fmt, subtype = audio_formats.output_format(path, subtype)
    rate = sample_rate or self.sample_rate
    wav = self.decode(codes, sample_rate)[0]
    with files.atomic_path(path) as tmp:
      sf.write(tmp, wav, rate, subtype=subtype, format=fmt)

  def decode_embeddings(self, emb) -> np.ndarray:
    """Continuous embeddings [B, N, D] -> waveform, without quantisation."""
    emb = checks.check_embeddings(emb, self.config.embedding_dim)
    return np.asarray(self._decode_emb(self.params, emb))

  # Validation ----------------------------------------------------------------

  def _check_wav(self, wav, sample_rate: int | None = None) -> np.ndarray:
    """float32 audio at the model's rate; see the module docstring."""
    wav = checks.as_array(wav, 'wav')
    if np.issubdtype(wav.dtype, np.floating) and wav.dtype != np.float32:
      wav = wav.astype(np.float32)
    wav = checks.check_audio(wav)
    return self._resample(wav, sample_rate, self.sample_rate)

  def _resample(self, wav: np.ndarray, rate, to) -> np.ndarray:
    """[B, T, C] from `rate` to `to` (None: no change) with soxr."""
    if rate is None or to is None:
      return wav
    for r in (rate, to):
      if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
        raise ValueError(f'sample_rate must be a positive int, got {r!r}')
    if rate == to:
      return wav
    out = np.stack([soxr.resample(x, int(rate), int(to)) for x in wav])
    if out.shape[1] == 0:
      raise ValueError(f'wav is too short to resample: {wav.shape[1]} samples')
    return out.astype(np.float32, copy=False)

  def _check_levels(self, levels) -> int:
    return checks.check_levels(levels, self.num_levels)

  def _check_codes(self, codes) -> np.ndarray:
    return checks.check_codes(codes, self.config.quantizer)

  # Jitted functions (one compile per input shape) --------------------------

  @functools.cached_property
  def streaming_weights(self) -> dict:
    """`streaming.prepare_weights` of this codec, shared by its streams."""
    return streaming.prepare_weights(self.compute_config, self.params)

  def _jit(self, fn, **kwargs):
    """jax.jit of `fn`, traced at this codec's precision."""
    return jax.jit(precision_lib.traced(fn, self.precision), **kwargs)

  @functools.cached_property
  def _embed(self):
    m = self._model
    return self._jit(lambda p, x: m.apply({'params': p}, x, method=m.embed))

  @functools.cached_property
  def _encode(self):
    m = self._model
    return self._jit(
      lambda p, x, n: m.apply({'params': p}, x, n, method=m.encode),
      static_argnums=2,
    )

  @functools.cached_property
  def _decode(self):
    m = self._model
    return self._jit(lambda p, c: m.apply({'params': p}, c, method=m.decode))

  @functools.cached_property
  def _decode_prefix(self):
    m = self._model
    return self._jit(
      lambda p, c, n: m.apply({'params': p}, c, n, method=m.decode_prefix)
    )

  @functools.cached_property
  def _decode_emb(self):
    m = self._model
    return self._jit(
      lambda p, e: m.apply({'params': p}, e, method=m.decode_embeddings)
    )
