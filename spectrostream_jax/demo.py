"""`spectrostream demo`: encode and decode each 40 ms frame as it comes.

It measures whether this host runs the codec in real time, frame by
frame, as a live sender and receiver would (docs/streaming.md).
"""

import argparse
import json
import time

import numpy as np
import soundfile as sf
import soxr

from spectrostream_jax import channels
from spectrostream_jax import files
from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--out', help='write the streamed reconstruction here')


def run(codec: Codec, levels: int, x: np.ndarray, rate: int, args) -> int:
  """Streams `x` [T, C] at `rate` Hz; prints a JSON timing report."""
  cfg = codec.config
  x = channels.to_channels(x, cfg.num_channels)
  if rate != cfg.sample_rate:
    x = soxr.resample(x, rate, cfg.sample_rate)
  length = x.shape[0]
  spf = cfg.samples_per_frame
  frames = -(-x.shape[0] // spf)
  x = np.pad(x, ((0, (frames + cfg.lookahead + 1) * spf - x.shape[0]), (0, 0)))
  enc = streaming.StreamingEncoder(codec, levels)
  dec = streaming.StreamingDecoder(codec)
  # Compile both steps before the clock starts.
  enc.push(np.zeros((1, 2 * spf, cfg.num_channels), np.float32))
  dec.push(np.zeros((1, 2, levels), np.int32))
  enc.reset()
  dec.reset()
  enc_ms, dec_ms, out = [], [], []
  for k in range(x.shape[0] // spf):
    t0 = time.perf_counter()
    codes = enc.push(x[None, k * spf : (k + 1) * spf])
    t1 = time.perf_counter()
    out.append(dec.push(codes)[0])
    t2 = time.perf_counter()
    if codes.shape[1]:
      enc_ms.append(1000 * (t1 - t0))
      dec_ms.append(1000 * (t2 - t1))
  budget = 1000 * spf / cfg.sample_rate
  total = np.array(enc_ms) + np.array(dec_ms)
  report = {
    'frames': len(total),
    'kbps': codec.levels_to_kbps(levels),
    'budget_ms': budget,
    'encode_ms_median': float(np.median(enc_ms)),
    'decode_ms_median': float(np.median(dec_ms)),
    'total_ms_median': float(np.median(total)),
    'total_ms_p95': float(np.percentile(total, 95)),
    'total_ms_max': float(np.max(total)),
    'frames_over_budget': int(np.sum(total > budget)),
    'real_time_factor': float(np.median(total) / budget),
    # Block k in gives code k - 1 and audio block k - 1 - lookahead, and
    # a block is only complete after its 40 ms: that is the latency.
    'latency_frames': enc.latency_frames + dec.latency_frames,
    'latency_ms': (enc.latency_frames + dec.latency_frames + 1) * budget,
  }
  print(json.dumps(report, indent=2))
  if args.out:
    y = np.concatenate(out)[:length]
    with files.atomic_path(args.out) as tmp:
      sf.write(tmp, y, cfg.sample_rate, subtype='FLOAT', format='WAV')
  return 0
