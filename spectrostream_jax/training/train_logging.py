"""What the trainer shows: TensorBoard events and a console progress bar.

Only process 0 writes; on other processes every method is a no-op, so the
loop calls them unconditionally. Scalars, audio and spectrogram images go
to one TensorBoard event file. Images are encoded as PNG here (numpy and
zlib), so logging needs no imaging library.
"""

import math
import struct
import time
import zlib

from absl import logging
import jax
import numpy as np
import rich.console
import rich.progress
from tensorboardX import summary as tb_summary
from tensorboardX.proto import summary_pb2
from tensorboardX.writer import FileWriter

from spectrostream_jax import signal

# Anchor colours of a perceptually ordered dark-to-bright map (magma-like).
_COLOURS = np.array(
  [
    [0, 0, 4],
    [59, 15, 112],
    [140, 41, 129],
    [222, 73, 104],
    [254, 159, 109],
    [252, 253, 191],
  ],
  np.float64,
)


def png(rgb: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG file bytes."""
  h, w, _ = rgb.shape
  rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, 3 * w)], 1)

  def chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return (
      struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))
    )

  header = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(rows.tobytes(), 6))
    + chunk(b'IEND', b'')
  )


def colourise(x: np.ndarray) -> np.ndarray:
  """Values in [0, 1], [H, W] -> uint8 [H, W, 3]."""
  pos = np.clip(x, 0.0, 1.0) * (len(_COLOURS) - 1)
  lo = np.minimum(np.floor(pos).astype(int), len(_COLOURS) - 2)
  frac = (pos - lo)[..., None]
  rgb = _COLOURS[lo] * (1.0 - frac) + _COLOURS[lo + 1] * frac
  return np.round(rgb).astype(np.uint8)


def spectrogram_image(
  wav: np.ndarray,
  sample_rate: int,
  window: int = 1024,
  num_mels: int = 80,
  dynamic_range_db: float = 80.0,
) -> np.ndarray:
  """Log-mel spectrogram of [T, C] audio as uint8 [C·num_mels, frames, 3].

  Channels are stacked top to bottom, low frequencies at the bottom of
  each; 0 dB is the loudest bin of the clip. The hop gives short clips
  about 256 columns.
  """
  hop = int(np.clip(wav.shape[0] // 256, 32, window // 4))
  x = np.pad(np.asarray(wav, np.float64).T, ((0, 0), (window // 2,) * 2))
  frames = 1 + (x.shape[1] - window) // hop
  index = np.arange(window)[None, :] + hop * np.arange(frames)[:, None]
  spec = np.abs(np.fft.rfft(x[:, index] * signal.hann_window(window), axis=-1))
  mel = spec @ signal.mel_filterbank(num_mels, window, sample_rate)
  db = 20.0 * np.log10(np.maximum(mel, 1e-10))
  db = (db - db.max() + dynamic_range_db) / dynamic_range_db
  # [C, frames, mels] -> [C·mels, frames], high frequencies first.
  image = np.concatenate([d.T[::-1] for d in db], axis=0)
  return colourise(image)


class Writer:
  """TensorBoard event file of process 0."""

  def __init__(self, logdir: str):
    self._writer = FileWriter(logdir) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    for tag, value in values.items():
      self._writer.add_summary(tb_summary.scalar(tag, float(value)), step)

  def audio(
    self, step: int, tag: str, wav: np.ndarray, sample_rate: int
  ) -> None:
    """[T, C] audio in [-1, 1] (clipped)."""
    if self._writer is None:
      return
    clipped = np.clip(np.asarray(wav, np.float32), -1.0, 1.0)
    self._writer.add_summary(
      tb_summary.audio(tag, clipped, sample_rate=sample_rate), step
    )

  def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
    """uint8 [H, W, 3]."""
    if self._writer is None:
      return
    h, w, _ = rgb.shape
    image = summary_pb2.Summary.Image(
      height=h, width=w, colorspace=3, encoded_image_string=png(rgb)
    )
    value = summary_pb2.Summary.Value(tag=tag, image=image)
    self._writer.add_summary(summary_pb2.Summary(value=[value]), step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class Progress:
  """Console progress bar with ETA, plus a log line at every report.

  The bar is drawn on a terminal only; the log lines are what a batch
  job's output file keeps.
  """

  def __init__(self, first_step: int, num_steps: int):
    self._enabled = jax.process_index() == 0
    console = rich.console.Console(stderr=True)
    self._num_steps = num_steps
    self._last = (first_step, time.perf_counter())
    self._bar = rich.progress.Progress(
      rich.progress.TextColumn('step'),
      rich.progress.MofNCompleteColumn(),
      rich.progress.BarColumn(),
      rich.progress.TimeElapsedColumn(),
      rich.progress.TextColumn('ETA'),
      rich.progress.TimeRemainingColumn(),
      rich.progress.TextColumn('{task.fields[info]}'),
      console=console,
      disable=not (self._enabled and console.is_terminal),
    )
    self._task = self._bar.add_task(
      'train', total=num_steps, completed=first_step, info=''
    )
    self._bar.start()

  def update(self, step: int) -> None:
    self._bar.update(self._task, completed=step)

  def report(self, step: int, values: dict[str, float]) -> float:
    """Logs `values` at `step`; returns the steps per second since last."""
    last_step, last_time = self._last
    now = time.perf_counter()
    rate = (step - last_step) / max(now - last_time, 1e-9)
    self._last = (step, now)
    if self._enabled:
      remaining = (self._num_steps - step) / rate if rate > 0 else math.inf
      text = ' '.join(f'{k} {v:.4g}' for k, v in values.items())
      first = next(iter(values.items()), None)
      info = f'{first[0]} {first[1]:.4g}' if first else ''
      self._bar.update(self._task, completed=step, info=info)
      logging.info(
        'step %d/%d | %s | %.3g steps/s | ETA %s',
        step,
        self._num_steps,
        text,
        rate,
        _duration(remaining),
      )
    return rate

  def restart_clock(self) -> None:
    """The next rate leaves out the time since the last report (evals)."""
    self._last = (self._last[0], time.perf_counter())

  def close(self) -> None:
    self._bar.stop()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  minutes, s = divmod(int(seconds), 60)
  hours, m = divmod(minutes, 60)
  return f'{hours}:{m:02d}:{s:02d}'
