"""`spectrostream demo`: encode and decode each 40 ms frame as it comes.

It measures whether this host runs the codec in real time, as a live
sender and receiver would (docs/streaming.md): frame k of the file becomes
available at k·40 ms, a step starts when its frames are in and the
previous step is done, and a frame whose audio comes out after its
deadline is counted as dropped (a player would have skipped it); the
stream goes on regardless.
"""

import argparse
import json
import time

import numpy as np
import soundfile as sf
import soxr

from spectrostream_jax import channels
from spectrostream_jax import commands
from spectrostream_jax import files
from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    '--seconds',
    type=commands.positive_number,
    default=10.0,
    metavar='S',
    help='stream the first S seconds of the input (default 10)',
  )
  parser.add_argument(
    '--out',
    type=commands.file_name,
    metavar='FILE',
    help='write the streamed reconstruction here (format from the extension)',
  )
  parser.add_argument(
    '--frames-per-step',
    type=commands.whole_count,
    default=1,
    metavar='N',
    help='40 ms frames pushed per call: more throughput, N - 1 more frames '
    'of latency (default 1: live)',
  )


def run(
  codec: Codec,
  levels: int,
  x: np.ndarray,
  rate: int,
  args,
  out_format: tuple[str, str] = ('WAV', 'FLOAT'),
) -> int:
  """Streams `x` [T, C] at `rate` Hz in real time; prints a JSON report.

  `out_format` is the (format, subtype) `--out` is written in.
  """
  cfg = codec.config
  n = getattr(args, 'frames_per_step', 1)
  x = channels.to_channels(x, cfg.num_channels)
  if rate != cfg.sample_rate:
    x = soxr.resample(x, rate, cfg.sample_rate)
  length = x.shape[0]
  spf = cfg.samples_per_frame
  budget = spf / cfg.sample_rate  # Seconds per frame.
  # Whole steps (one compiled size) of signal and zeros, until the audio
  # of its last frame is out: step s gets the codes of frames < s·n (the
  # STFT overhang of frame s·n - 1 is in the next step), and the last
  # frame's audio needs `lookahead` codes past it.
  steps = -(-(-(-length // spf) + cfg.lookahead) // n) + 1
  frames = steps * n
  x = np.pad(x, ((0, frames * spf - length), (0, 0)))
  enc = streaming.StreamingEncoder(codec, levels, frames_per_step=n)
  dec = streaming.StreamingDecoder(codec, frames_per_step=n)
  # Compile both steps before the clock starts.
  dec.push(enc.push(np.zeros((1, 2 * n * spf, cfg.num_channels), np.float32)))
  enc.reset()
  dec.reset()
  enc_ms, dec_ms, out = [], [], []
  late_steps = dropped = produced = coded = 0
  latency = []  # Per output frame: its output time - its capture start.
  done = 0.0
  start = time.perf_counter()
  for k in range(0, frames, n):
    # Frames k..k+n-1 are in once the last has been captured.
    available = (k + n - 1) * budget
    now = time.perf_counter() - start
    if now < available:
      time.sleep(available - now)
    t0 = time.perf_counter()
    codes = enc.push(x[None, k * spf : (k + n) * spf])
    t1 = time.perf_counter()
    y = dec.push(codes)[0]
    t2 = time.perf_counter()
    out.append(y)
    # Due before the next step's frames are all in, n frames later.
    done = t2 - start
    late = done > available + n * budget
    if codes.shape[1]:  # Per frame, for steps of any size.
      enc_ms.append(1000 * (t1 - t0) / codes.shape[1])
      dec_ms.append(1000 * (t2 - t1) / codes.shape[1])
      coded += codes.shape[1]
    m = y.shape[0] // spf
    if late:
      late_steps += 1
      dropped += m
    # Output frame j was captured from (j - 1)·40 ms (frame 0 is in at 0).
    for j in range(produced, produced + m):
      latency.append(1000 * (done - (j - 1) * budget))
    produced += m
  total = np.array(enc_ms) + np.array(dec_ms)
  budget_ms = 1000 * budget
  # Step s pushes frames sn..sn+n-1 and gets audio up to frame
  # sn - 1 - lookahead; the first frame of that audio waited the longest.
  worst = 2 * n + enc.latency_frames + dec.latency_frames - 1
  report = {
    'frames': coded,
    'frames_per_step': n,
    'kbps': codec.levels_to_kbps(levels),
    'budget_ms': budget_ms,
    'encode_ms_median': float(np.median(enc_ms)),
    'decode_ms_median': float(np.median(dec_ms)),
    'total_ms_median': float(np.median(total)),
    'total_ms_p95': float(np.percentile(total, 95)),
    'total_ms_max': float(np.max(total)),
    'frames_over_budget': int(np.sum(total > budget_ms)),
    'real_time_factor': float(np.median(total) / budget_ms),
    # Real-time schedule: frames whose audio came out after its deadline.
    'frames_dropped': dropped,
    'frames_out': produced,
    'late_steps': late_steps,
    'latency_frames': worst - 1,
    'latency_ms': worst * budget_ms,
    'latency_ms_measured_median': float(np.median(latency)),
    'latency_ms_measured_max': float(np.max(latency)),
  }
  print(json.dumps(report, indent=2))
  if args.out:
    y = np.concatenate(out)[:length]
    with files.atomic_path(args.out) as tmp:
      fmt, subtype = out_format
      sf.write(tmp, y, cfg.sample_rate, subtype=subtype, format=fmt)
  return 0
