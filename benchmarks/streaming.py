"""Per-frame streaming cost, as a ratio to the whole-sequence cost.

    python benchmarks/streaming.py [--preset production] [--frames 100]
        [--update-docs]

Pushes audio 1920 samples (one 40 ms frame) at a time through
`StreamingEncoder` (64-level codes) and the codes one frame at a time
through `StreamingDecoder`, the way a live application would, and times
every frame, host overhead included. Between slices of the stream it runs
the whole-sequence encode and decode (`Codec.encode` / `Codec.decode`) of
the audio just streamed, so that both paths see the same load from other
jobs: their ratio is the primary figure, the absolute medians (with the
matmul rate and the load average of the run) say how fast this host was.
The device-only steps also give their FLOPs per frame
(`spectrostream_jax.flops`) and, on an accelerator in `flops.PEAKS`, the
MFU. Prints JSON; `--update-docs` writes its section of
docs/benchmarks.md.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import flops as flops_lib
from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib

try:
  from benchmarks import report
  from benchmarks.codec_speed import matmul_rate
except ImportError:  # Run as a script from the repository root.
  from codec_speed import matmul_rate
  import report

# Targets of issue 18 for the production model: per-frame cost over the
# whole-sequence per-frame cost of the same run, and medians on a quiet
# 2-core host (together they fit one 40 ms frame).
TARGET_RATIO = {'encode': 1.5, 'decode': 1.2}
TARGET_MS = {'encode': 12.0, 'decode': 30.0}


def _stats(ms) -> dict:
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


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _loads(values) -> str:
  return ', '.join(f'{v:g}' for v in values)


def interleaved(codec: Codec, wav: np.ndarray, levels: int, rounds: int):
  """Streams `wav` frame by frame; after each of `rounds` slices, times the
  whole-sequence path on that slice. Returns per-frame milliseconds."""
  spf = codec.config.samples_per_frame
  frames = wav.shape[1] // spf - 1  # The last frame feeds the STFT overhang.
  per_round = -(-frames // rounds)
  enc = streaming.StreamingEncoder(codec, levels)
  dec = streaming.StreamingDecoder(codec)
  # Compile every call once (the slices have one length but the last).
  dec.push(enc.push(wav[:, : 3 * spf]))
  enc.reset()
  dec.reset()
  starts = range(0, frames, per_round)
  slices = [(s, min(s + per_round, frames)) for s in starts]
  for a, b in {b - a: (a, b) for a, b in slices}.values():
    codec.decode(codec.encode(wav[:, a * spf : b * spf], levels))
  out = {name: [] for name in ('encode', 'decode', 'whole_encode')}
  out['whole_decode'] = []
  pos = 0  # Samples pushed so far.
  for a, b in slices:
    while pos < (b + 1) * spf:
      codes, t_enc = _timed(enc.push, wav[:, pos : pos + spf])
      _, t_dec = _timed(dec.push, codes)
      pos += spf
      if codes.shape[1]:
        out['encode'].append(t_enc)
        out['decode'].append(t_dec)
    chunk = wav[:, a * spf : b * spf]
    codes, t_enc = _timed(codec.encode, chunk, levels)
    _, t_dec = _timed(codec.decode, codes)
    # Per frame computed: the decoder runs its look-ahead frames too.
    out['whole_encode'].append(t_enc / (b - a))
    out['whole_decode'].append(t_dec / (b - a))
  return out


def several_per_step(codec: Codec, wav: np.ndarray, levels: int, n: int):
  """Per-frame milliseconds when each call takes `n` frames (demo's
  `--frames-per-step`): the weights are read once per n frames."""
  spf = codec.config.samples_per_frame
  enc = streaming.StreamingEncoder(codec, levels, frames_per_step=n)
  dec = streaming.StreamingDecoder(codec, frames_per_step=n)
  dec.push(enc.push(wav[:, : 2 * n * spf]))
  enc.reset()
  dec.reset()
  out = {'encode': [], 'decode': []}
  for pos in range(0, wav.shape[1] - n * spf + 1, n * spf):
    codes, t_enc = _timed(enc.push, wav[:, pos : pos + n * spf])
    _, t_dec = _timed(dec.push, codes)
    if codes.shape[1] == n:
      out['encode'].append(t_enc / n)
      out['decode'].append(t_dec / n)
  return out


def device_steps(codec: Codec, levels: int, frames: int) -> dict:
  """The jitted steps alone, inputs already on the device, and their
  FLOPs (float32 MFU)."""
  cfg = codec.config
  weights = codec.streaming_weights
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
    flops = flops_lib.count(
      lambda s, x, step=step, extra=extra: step(cfg, weights, s, x, *extra),
      state,
      x,
    )
    state, *y = step(cfg, weights, state, x, *extra)
    jax.block_until_ready(y)
    times = []
    for _ in range(frames):
      start = time.perf_counter()
      state, *y = step(cfg, weights, state, x, *extra)
      jax.block_until_ready(y)
      times.append(1000 * (time.perf_counter() - start))
    out[name] = _stats(times)
    out[name]['gflop'] = round(flops / 1e9, 3)
    mfu = flops_lib.mfu(flops, min(times) / 1000, 'float32', devices=1)
    out[name]['mfu'] = None if mfu is None else round(mfu, 5)
  return out


def run(
  preset: str,
  frames: int,
  levels: int | None,
  rounds: int,
  frames_per_step: list[int],
) -> dict:
  """Streams `frames` frames of random audio; the module docstring's JSON."""
  cfg = codec_lib.get_config(preset)
  levels = levels or cfg.quantizer.num_levels
  codec = Codec.random(cfg)
  rng = np.random.default_rng(0)
  samples = (frames + 1) * cfg.samples_per_frame
  wav = rng.uniform(-0.5, 0.5, (1, samples, cfg.num_channels))
  wav = wav.astype(np.float32)
  budget = 1000 * cfg.samples_per_frame / cfg.sample_rate
  result = {
    'benchmark': 'streaming',
    'preset': preset,
    'levels': levels,
    'frames': frames,
    'rounds': rounds,
    'budget_ms': budget,
    'target_ratio': TARGET_RATIO,
    'target_quiet_ms': TARGET_MS,
    **report.environment(),
    'load_before': _load(),
    'matmul_gflop_per_s_before': round(matmul_rate(), 1),
  }
  ms = interleaved(codec, wav, levels, rounds)
  for name in ('encode', 'decode'):
    whole = float(np.median(ms[f'whole_{name}']))
    s = _stats(ms[name])
    s['frames_over_budget'] = int(np.sum(np.asarray(ms[name]) > budget))
    s['whole_sequence_ms_per_frame'] = round(whole, 2)
    s['ratio'] = round(s['median_ms'] / whole, 2)
    s['meets_ratio'] = s['ratio'] <= TARGET_RATIO[name]
    s['meets_quiet_ms'] = s['median_ms'] <= TARGET_MS[name]
    result[name] = s
  total = np.asarray(ms['encode']) + np.asarray(ms['decode'])
  result['encode_plus_decode'] = _stats(total)
  result['encode_plus_decode']['frames_over_budget'] = int(
    np.sum(total > budget)
  )
  result['frames_per_step'] = {}
  for n in frames_per_step:
    several = several_per_step(codec, wav, levels, n)
    row = {'latency_ms': (2 * n + cfg.lookahead) * budget}
    for name in ('encode', 'decode'):
      median = float(np.median(several[name]))
      row[f'{name}_median_ms'] = round(median, 2)
      row[f'{name}_ratio'] = round(
        median / result[name]['whole_sequence_ms_per_frame'], 2
      )
    result['frames_per_step'][str(n)] = row
  result['device_step'] = device_steps(codec, levels, frames)
  result['latency'] = {
    'encoder_frames': 1,
    'decoder_frames': cfg.lookahead,
    'end_to_end_ms': (2 + cfg.lookahead) * budget,
  }
  result['matmul_gflop_per_s_after'] = round(matmul_rate(), 1)
  result['load_after'] = _load()
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='production')
  ap.add_argument('--frames', type=int, default=100)
  ap.add_argument('--levels', type=int, default=None)
  ap.add_argument(
    '--rounds',
    type=int,
    default=5,
    help='slices of the stream, each followed by a whole-sequence run',
  )
  ap.add_argument(
    '--frames-per-step',
    type=int,
    nargs='*',
    default=[2, 4],
    help='also stream N frames per call and report their per-frame cost',
  )
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()

  result = run(
    args.preset, args.frames, args.levels, args.rounds, args.frames_per_step
  )
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('streaming', result, markdown)


def markdown(r: dict) -> str:
  lines = [
    '## Streaming: per-frame encode and decode',
    '',
    f'{r["preset"]} model, one 40 ms frame (1920 samples) per step through '
    f'`StreamingEncoder` ({r["levels"]}-level codes) and '
    f'`StreamingDecoder`, {r["frames"]} frames, host overhead included. '
    'The whole-sequence path (`Codec.encode` / `Codec.decode`) runs on the '
    f'audio just streamed after each of {r["rounds"]} slices of the stream, '
    'so both see the same load; the ratio of the medians is the figure to '
    f'compare across hosts. Targets: ratio ≤ {r["target_ratio"]["encode"]:g}'
    f' (encode) and ≤ {r["target_ratio"]["decode"]:g} (decode); on a quiet '
    f'host, medians ≤ {r["target_quiet_ms"]["encode"]:g} ms and ≤ '
    f'{r["target_quiet_ms"]["decode"]:g} ms, so that both fit one '
    f'{r["budget_ms"]:g} ms frame.',
    '',
    '| path | median | p90 | max | whole sequence, per frame | ratio '
    '| frames over 40 ms | ratio target met |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name in ('encode', 'decode'):
    s = r[name]
    lines.append(
      f'| {name} | {s["median_ms"]} ms | {s["p90_ms"]} ms | {s["max_ms"]} ms '
      f'| {s["whole_sequence_ms_per_frame"]} ms | **{s["ratio"]}×** '
      f'| {s["frames_over_budget"]} of {r["frames"]} '
      f'| {"yes" if s["meets_ratio"] else "no"} |'
    )
  t = r['encode_plus_decode']
  lines += [
    f'| encode + decode | {t["median_ms"]} ms | {t["p90_ms"]} ms '
    f'| {t["max_ms"]} ms | | | {t["frames_over_budget"]} of {r["frames"]} '
    '| |',
    '',
    'Quiet-host medians met: encode '
    f'{"yes" if r["encode"]["meets_quiet_ms"] else "no"}, decode '
    f'{"yes" if r["decode"]["meets_quiet_ms"] else "no"}. Host: matmul '
    f'{r["matmul_gflop_per_s_before"]} GFLOP/s before the run and '
    f'{r["matmul_gflop_per_s_after"]} after; load average (1, 5, 15 min) '
    f'{_loads(r["load_before"])} before and {_loads(r["load_after"])} after '
    f'({r["cpu_count"]} cores: a load above that means other jobs shared '
    'them, and the absolute figures are slower than on a quiet host). '
    'Device-only step (jitted call '
    f'on device inputs, no host work): encode '
    f'{r["device_step"]["encode"]["median_ms"]} ms, decode '
    f'{r["device_step"]["decode"]["median_ms"]} ms (medians), '
    f'{_flops_words(r["device_step"])}. Latency: the '
    'encoder emits frame k − 1 after frame k, the decoder lags '
    f'{r["latency"]["decoder_frames"]} frame(s): '
    f'{r["latency"]["end_to_end_ms"]:g} ms end to end with the frame '
    'itself. Where the time goes: docs/streaming.md, "Performance".',
    '',
    *_several_lines(r),
    report.machine_line(r),
    '',
    *report.json_details(r),
  ]
  return '\n'.join(lines)


def _flops_words(steps: dict) -> str:
  """FLOPs per frame of the two device steps, with their MFU if known."""
  e, d = steps['encode'], steps['decode']
  words = f'{e.get("gflop")} and {d.get("gflop")} GFLOP per frame'
  if e.get('mfu') is not None:
    words += f' (MFU {report.percent(e["mfu"])} and {report.percent(d["mfu"])})'
  return words


def _several_lines(r: dict) -> list[str]:
  """The `--frames-per-step` rows: throughput bought with latency."""
  rows = r.get('frames_per_step') or {}
  if not rows:
    return []
  lines = [
    'Several frames per call (`spectrostream demo --frames-per-step N`), '
    'per frame, ratios to the same whole-sequence figures:',
    '',
    '| frames per call | encode | ratio | decode | ratio | latency |',
    '|---|---|---|---|---|---|',
  ]
  for n, row in rows.items():
    lines.append(
      f'| {n} | {row["encode_median_ms"]} ms | {row["encode_ratio"]}× '
      f'| {row["decode_median_ms"]} ms | {row["decode_ratio"]}× '
      f'| {row["latency_ms"]:g} ms |'
    )
  return [*lines, '']


if __name__ == '__main__':
  main()
