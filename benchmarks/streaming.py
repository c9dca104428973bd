"""Per-frame streaming encode / decode time against the 40 ms frame budget.

    python benchmarks/streaming.py [--preset production] [--frames 100]

Pushes audio 1920 samples (one 40 ms frame) at a time through
`StreamingEncoder` (64-level codes) and the codes one frame at a time
through `StreamingDecoder`, the way a real-time application would, and
times every frame, host overhead included. Also reports the device-only
step time and, from the same run, the whole-sequence cost per frame and
this machine's float32 matmul rate, since the 2-core machine is shared and
its speed drifts. Prints JSON; `--update-docs` writes docs/benchmarks.md.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib

try:
  from benchmarks import report
  from benchmarks.codec_speed import matmul_rate
except ImportError:  # Run as a script from the repository root.
  from codec_speed import matmul_rate
  import report

# Targets of the streaming issue for the production model on 2 CPU cores.
TARGET_MS = {'encode': 20.0, 'decode': 40.0}


def _stats(ms: list[float]) -> dict:
  a = np.asarray(ms)
  return {
    'median_ms': round(float(np.median(a)), 2),
    'p90_ms': round(float(np.percentile(a, 90)), 2),
    'min_ms': round(float(a.min()), 2),
    'max_ms': round(float(a.max()), 2),
  }


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, 1000 * (time.perf_counter() - start)


def stream_frames(codec: Codec, wav: np.ndarray, levels: int) -> dict:
  """Frame-by-frame wall time of the public wrappers."""
  spf = codec.config.samples_per_frame
  enc = streaming.StreamingEncoder(codec, levels)
  dec = streaming.StreamingDecoder(codec)
  # Compile, then start both streams afresh.
  dec.push(enc.push(wav[:, : 3 * spf]))
  enc.reset()
  dec.reset()
  enc_ms, dec_ms = [], []
  for k in range(wav.shape[1] // spf):
    codes, t_enc = _timed(enc.push, wav[:, k * spf : (k + 1) * spf])
    _, t_dec = _timed(dec.push, codes)
    if codes.shape[1]:
      enc_ms.append(t_enc)
      dec_ms.append(t_dec)
  return {'encode': enc_ms, 'decode': dec_ms}


def device_steps(codec: Codec, levels: int, frames: int) -> dict:
  """The jitted steps alone, inputs already on the device."""
  cfg = codec.config
  weights = streaming.prepare_weights(cfg, codec.params)
  window = jnp.zeros((1, cfg.samples_per_frame + cfg.hop_length, 2))
  codes = jnp.zeros((1, 1, levels), jnp.int32)
  out = {}
  for name, step, state, x, extra in (
    (
      'encode',
      streaming.encode_step,
      streaming.init_encoder_state(cfg, weights),
      window,
      (levels,),
    ),
    (
      'decode',
      streaming.decode_step,
      streaming.init_decoder_state(cfg, weights),
      codes,
      (),
    ),
  ):
    state, *y = step(cfg, weights, state, x, *extra)
    jax.block_until_ready(y)
    times = []
    for _ in range(frames):
      start = time.perf_counter()
      state, *y = step(cfg, weights, state, x, *extra)
      jax.block_until_ready(y)
      times.append(1000 * (time.perf_counter() - start))
    out[name] = _stats(times)
  return out


def whole_sequence_ms(codec: Codec, wav: np.ndarray, levels: int) -> dict:
  """Per-frame cost of the whole-sequence path on the same audio."""
  n = wav.shape[1] // codec.config.samples_per_frame
  codes = codec.encode(wav, levels)
  codec.decode(codes)
  enc = min(_timed(codec.encode, wav, levels)[1] for _ in range(2))
  dec = min(_timed(codec.decode, codes)[1] for _ in range(2))
  return {
    'encode_ms_per_frame': round(enc / n, 2),
    'decode_ms_per_frame': round(dec / (n - codec.config.lookahead), 2),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='production')
  ap.add_argument('--frames', type=int, default=100)
  ap.add_argument('--levels', type=int, default=None)
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()

  cfg = codec_lib.get_config(args.preset)
  levels = args.levels or cfg.quantizer.num_levels
  codec = Codec.random(cfg)
  rng = np.random.default_rng(0)
  samples = (args.frames + 1) * cfg.samples_per_frame
  wav = rng.uniform(-0.5, 0.5, (1, samples, cfg.num_channels))
  wav = wav.astype(np.float32)
  budget = 1000 * cfg.samples_per_frame / cfg.sample_rate
  result = {
    'benchmark': 'streaming',
    'preset': args.preset,
    'levels': levels,
    'frames': args.frames,
    'budget_ms': budget,
    'targets_ms': TARGET_MS,
    **report.environment(),
    'matmul_gflop_per_s_before': round(matmul_rate(), 1),
  }
  frames = stream_frames(codec, wav, levels)
  for name, ms in frames.items():
    result[name] = _stats(ms)
    result[name]['frames_over_budget'] = int(np.sum(np.asarray(ms) > budget))
    result[name]['meets_target'] = result[name]['median_ms'] <= TARGET_MS[name]
  total = np.asarray(frames['encode']) + np.asarray(frames['decode'])
  result['encode_plus_decode'] = _stats(list(total))
  result['device_step'] = device_steps(codec, levels, args.frames)
  result['whole_sequence'] = whole_sequence_ms(codec, wav, levels)
  result['latency'] = {
    'encoder_frames': 1,
    'decoder_frames': cfg.lookahead,
    'end_to_end_ms': (2 + cfg.lookahead) * budget,
  }
  result['matmul_gflop_per_s_after'] = round(matmul_rate(), 1)
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('streaming', result, markdown)


def markdown(r: dict) -> str:
  w = r['whole_sequence']
  lines = [
    '## Streaming: per-frame encode and decode',
    '',
    f'{r["preset"]} model, one 40 ms frame (1920 samples) per step through '
    f'`StreamingEncoder` ({r["levels"]}-level codes) and '
    f'`StreamingDecoder`, {r["frames"]} frames, host overhead included. '
    f'Budget: {r["budget_ms"]:g} ms per frame; targets: encode ≤ '
    f'{r["targets_ms"]["encode"]:g} ms, decode ≤ '
    f'{r["targets_ms"]["decode"]:g} ms.',
    '',
    '| path | median | p90 | min | max | frames over 40 ms | target met |',
    '|---|---|---|---|---|---|---|',
  ]
  for name in ('encode', 'decode'):
    s = r[name]
    lines.append(
      f'| {name} | {s["median_ms"]} ms | {s["p90_ms"]} ms | {s["min_ms"]} ms '
      f'| {s["max_ms"]} ms | {s["frames_over_budget"]} of {r["frames"]} '
      f'| {"yes" if s["meets_target"] else "no"} |'
    )
  t = r['encode_plus_decode']
  lines += [
    f'| encode + decode | {t["median_ms"]} ms | {t["p90_ms"]} ms '
    f'| {t["min_ms"]} ms | {t["max_ms"]} ms | | |',
    '',
    f'Device-only step (jitted call on device inputs): encode '
    f'{r["device_step"]["encode"]["median_ms"]} ms, decode '
    f'{r["device_step"]["decode"]["median_ms"]} ms (medians). Whole-sequence '
    f'path on the same audio, per frame: encode {w["encode_ms_per_frame"]} '
    f'ms, decode {w["decode_ms_per_frame"]} ms. Matmul rate in this run: '
    f'{r["matmul_gflop_per_s_before"]} GFLOP/s before, '
    f'{r["matmul_gflop_per_s_after"]} after (it drifts with the load of '
    'the shared machine). Latency: the encoder emits frame k − 1 after '
    f'frame k, the decoder lags {r["latency"]["decoder_frames"]} frame(s): '
    f'{r["latency"]["end_to_end_ms"]:g} ms end to end with the frame '
    'itself.',
    '',
    report.machine_line(r),
    '',
    *report.json_details(r),
  ]
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
