"""Procedural stereo music, so the trainer runs on a machine with no data.

Each clip is an excerpt of a made-up song: a chord progression in a
random key, scale and tempo, played by two to four synthetic instruments
(bass, pad, arpeggio, lead: additive harmonics under ADSR envelopes,
panned), usually over a drum kit (pitch-swept kick, noisy snare, hats),
in a stereo noise reverb of random size. A clip is a pure function of the
numpy generator it is given, so the source is deterministic.

This is for smoke runs, demos and tests: a codec trained on it will not
be good on real music. Real training data comes from files or ArrayRecord
datasets (see docs/data.md).
"""

import math

import numpy as np

from spectrostream_jax.data import loudness

SCALES = (
  (0, 2, 4, 5, 7, 9, 11),  # major
  (0, 2, 3, 5, 7, 8, 10),  # natural minor
  (0, 2, 3, 5, 7, 9, 10),  # dorian
  (0, 2, 4, 5, 7, 9, 10),  # mixolydian
  (0, 2, 3, 5, 7, 8, 11),  # harmonic minor
)
# Chord roots as scale degrees, one chord per bar or half bar.
PROGRESSIONS = (
  (0, 4, 5, 3),
  (0, 5, 3, 4),
  (0, 3, 4, 4),
  (5, 3, 0, 4),
  (0, 0, 3, 4),
  (1, 4, 0, 0),
)
_PREROLL_SECONDS = 0.5
# Reverb tails are cut after this long (-30 dB at the longest RT60).
_MAX_TAIL_SECONDS = 1.0
_TABLE_SIZE = 2048


def _hz(midi: float) -> float:
  return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def _pan(mono: np.ndarray, pan: float) -> np.ndarray:
  """Constant-power pan, pan in [-1, 1]: [N] -> [2, N]."""
  angle = (pan + 1.0) * math.pi / 4.0
  return np.array([[math.cos(angle)], [math.sin(angle)]]) * mono


def _add(out: np.ndarray, sound: np.ndarray, start: int) -> None:
  """Mixes `sound` [2, N] into `out` at sample `start`, clipped to out."""
  lo, hi = max(start, 0), min(start + sound.shape[1], out.shape[1])
  if lo < hi:
    out[:, lo:hi] += sound[:, lo - start : hi - start]


class _Instrument:
  """Additive-harmonic voice with an ADSR envelope and a pan position."""

  def __init__(self, rng: np.random.Generator, role: str):
    num = int(rng.integers(3, 16))
    tilt = rng.uniform(0.6, 1.6)
    odd_bias = rng.uniform(0.2, 1.0)
    h = np.arange(1, num + 1)
    self.amps = h**-tilt * np.where(h % 2 == 1, 1.0, odd_bias)
    self.phases = rng.uniform(0, 2 * np.pi, num)
    slow = role == 'pad'
    self.attack = rng.uniform(0.15, 0.6) if slow else rng.uniform(0.002, 0.03)
    self.decay = rng.uniform(0.05, 0.4)
    self.sustain = rng.uniform(0.3, 0.9)
    self.release = rng.uniform(0.05, 0.5)
    self.pan = 0.0 if role == 'bass' else rng.uniform(-0.8, 0.8)
    self.gain = {'bass': 0.5, 'pad': 0.25, 'arp': 0.2, 'lead': 0.3}[role]
    self.vibrato = rng.uniform(0.0, 0.004) if role == 'lead' else 0.0
    self._tables = {}

  def length(self, seconds: float, sample_rate: int) -> int:
    return int((seconds + self.release) * sample_rate)

  def note(
    self, midi: float, seconds: float, sample_rate: int, lo: int, hi: int
  ) -> np.ndarray:
    """Samples [lo, hi) of a note held for `seconds` (then released)."""
    freq = _hz(midi)
    t = np.arange(lo, hi, dtype=np.float32) / np.float32(sample_rate)
    cycles = np.float32(freq) * t
    if self.vibrato:
      rate = 2 * np.pi * 5.5
      cycles += np.float32(self.vibrato * freq / rate) * np.sin(rate * t)
    index = ((cycles % 1.0) * _TABLE_SIZE).astype(np.int32)
    wave = self._table(int(0.45 * sample_rate / freq))[index]
    attack = np.minimum(t / np.float32(self.attack), 1.0)
    decay = np.exp((self.attack - np.maximum(t, self.attack)) / self.decay)
    env = attack * (self.sustain + (1 - self.sustain) * decay)
    release = (seconds + self.release - t) / np.float32(self.release)
    return wave * env * np.clip(release, 0.0, 1.0)

  def _table(self, max_harmonics: int) -> np.ndarray:
    """One period, band-limited to `max_harmonics`, scaled by the gain."""
    usable = max(1, min(self.amps.size, max_harmonics))
    if usable not in self._tables:
      h = np.arange(1, usable + 1)[:, None]
      grid = 2 * np.pi * np.arange(_TABLE_SIZE) / _TABLE_SIZE
      wave = (
        np.sin(h * grid + self.phases[:usable, None]).T @ self.amps[:usable]
      )
      scale = self.gain / np.sum(self.amps[:usable])
      self._tables[usable] = (wave * scale).astype(np.float32)
    return self._tables[usable]


def _drum(kind: str, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  seconds = {'kick': 0.45, 'snare': 0.3, 'hat': 0.12}[kind]
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  if kind == 'kick':
    freq = 45.0 + 110.0 * np.exp(-t * 35.0)
    body = np.sin(2 * np.pi * np.cumsum(freq) / sample_rate)
    return _pan(0.9 * body * np.exp(-t * 7.0), 0.0)
  noise = rng.standard_normal(t.size)
  if kind == 'snare':
    tone = 0.4 * np.sin(2 * np.pi * 185.0 * t) * np.exp(-t * 18.0)
    crack = np.diff(noise, prepend=0.0) * 0.35 * np.exp(-t * 22.0)
    return _pan(0.6 * (tone + crack), rng.uniform(-0.15, 0.15))
  hiss = np.diff(noise, n=2, prepend=[0.0, 0.0]) * 0.12
  return _pan(
    hiss * np.exp(-t * rng.uniform(35.0, 80.0)), rng.uniform(-0.4, 0.4)
  )


def _reverb(x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
  """Stereo reverb: decorrelated exponentially decaying noise per side."""
  rt60 = rng.uniform(0.3, 2.0)
  t = np.arange(int(min(rt60, _MAX_TAIL_SECONDS) * sr)) / sr
  predelay = int(rng.uniform(0.005, 0.03) * sr)
  ir = rng.standard_normal((2, t.size)) * np.exp(-6.9 * t / rt60)
  ir /= np.sqrt(np.sum(ir**2, axis=1, keepdims=True))
  ir = np.concatenate([np.zeros((2, predelay)), ir], axis=1)
  size = loudness.fft_size(x.shape[1] + ir.shape[1])
  wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)
  wet = wet[:, : x.shape[1]]
  mix = rng.uniform(0.1, 0.35)
  return (1 - mix) * x + mix * wet


def render(
  rng: np.random.Generator, num_samples: int, sample_rate: int = 48_000
) -> np.ndarray:
  """One clip of procedural stereo music, float32 [num_samples, 2]."""
  preroll = int(_PREROLL_SECONDS * sample_rate)
  total = num_samples + preroll
  beat = 60.0 / rng.uniform(70.0, 170.0)
  root = int(rng.integers(33, 45))  # bass root between A1 and G#2
  scale = SCALES[rng.integers(len(SCALES))]
  progression = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
  chord_beats = int(rng.choice([2, 4]))
  # Song time of the first rendered sample: clips start anywhere in a loop.
  song_start = rng.uniform(0.0, len(progression) * chord_beats * beat)
  end = song_start + total / sample_rate

  def pitch(degree: int, octave: int) -> int:
    return root + 12 * (octave + degree // 7) + scale[degree % 7]

  def chord(time: float) -> int:
    return progression[int(time / (chord_beats * beat)) % len(progression)]

  def grid(step: float) -> np.ndarray:
    return (
      np.arange(math.floor(song_start / step), math.ceil(end / step)) * step
    )

  out = np.zeros((2, total))
  roles = ['bass'] + [r for r in ('pad', 'arp', 'lead') if rng.random() < 0.6]
  if len(roles) == 1:
    roles.append(('pad', 'arp', 'lead')[rng.integers(3)])
  for role in roles:
    inst = _Instrument(rng, role)
    if role == 'bass':
      step = beat * float(rng.choice([0.5, 1.0]))
      notes = [(s, step * 0.9, pitch(chord(s), 0)) for s in grid(step)]
    elif role == 'pad':
      step = chord_beats * beat
      notes = [
        (s, step, pitch(chord(s) + k, 1)) for s in grid(step) for k in (0, 2, 4)
      ]
    elif role == 'arp':
      step = beat * float(rng.choice([0.25, 0.5]))
      pattern = (0, 2, 4, 7) if rng.random() < 0.5 else (0, 4, 2, 4)
      notes = [
        (s, step * 0.8, pitch(chord(s) + pattern[i % len(pattern)], 2))
        for i, s in enumerate(grid(step))
      ]
    else:
      step = beat * 0.5
      degree = int(rng.integers(0, 7))
      notes = []
      for s in grid(step):
        degree = int(np.clip(degree + rng.integers(-2, 3), -3, 10))
        if rng.random() < 0.7:
          notes.append((s, step * rng.choice([0.9, 1.8]), pitch(degree, 2)))
    voice = np.zeros(total)
    for start, seconds, midi in notes:
      offset = int(round((start - song_start) * sample_rate))
      lo = max(0, -offset)
      hi = min(inst.length(seconds, sample_rate), total - offset)
      if lo < hi:
        voice[offset + lo : offset + hi] += inst.note(
          midi, seconds, sample_rate, lo, hi
        )
    out += _pan(voice, inst.pan)
  if rng.random() < 0.8:
    sixteenth = rng.random() < 0.3
    four_on_floor = rng.random() < 0.4
    sounds = {k: _drum(k, rng, sample_rate) for k in ('kick', 'snare', 'hat')}
    for s in grid(beat / 4):
      position = int(round(s / (beat / 4))) % 16
      hits = []
      if position % (4 if four_on_floor else 8) == 0 or (
        position == 10 and not four_on_floor
      ):
        hits.append(('kick', 1.0))
      if position in (4, 12):
        hits.append(('snare', 1.0))
      if position % (1 if sixteenth else 2) == 0:
        hits.append(('hat', 0.5 + 0.5 * (position % 4 == 0)))
      for kind, velocity in hits:
        start = int(round((s - song_start) * sample_rate))
        _add(out, velocity * sounds[kind], start)
  out = _reverb(out, rng, sample_rate)[:, preroll:].T
  return (0.5 * out / max(float(np.max(np.abs(out))), 1e-6)).astype(np.float32)
