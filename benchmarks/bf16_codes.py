r"""Codes of a trained model encoded in bfloat16 and in float32, compared.

    python benchmarks/bf16_codes.py --model /work/runs/second_model \
        --data /tmp/debian_music/manifest.jsonl --clip-seconds 20

A bf16 encoder rounds every layer to 8 bits of mantissa, so its embedding
differs slightly from the f32 one. The RVQ's distances are f32 in both,
but a deeper level quantizes a smaller residual, and one code that flips
changes the residual of every level after it. This measures, on one clip
per eval track, how often the first n levels of a frame's codes agree
(n = 1, 2, 4, ... 64), and whether the codes that differ are worse: the
f32 decoder's mel distance and SI-SDR from each encode's codes at 1, 4 and
16 kbps (docs/training.md, "Mixed precision"). Prints JSON.
"""

import argparse
import json
import sys

import jax
import numpy as np

from spectrostream_jax import inference
from spectrostream_jax import losses
from spectrostream_jax.evaluation import clips as clips_lib

PREFIXES = (1, 2, 4, 8, 16, 32, 64)
KBPS = (1, 4, 16)
TRIM = 480  # Samples left out at the start, as the recipe A/B does.


def relative_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-frame ||a - b|| / ||a|| of [frames, dim] embeddings."""
  return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)


def quality(codec: inference.Codec, clip: np.ndarray, codes: np.ndarray):
  """{kbps: (mel distance, SI-SDR)} of the f32 decode of `codes`."""
  out = {}
  for kbps in KBPS:
    n = codec.kbps_to_levels(kbps)
    rec = codec.decode(codes[..., :n])
    ref, rec = losses.trim(clip[None], rec, TRIM)
    out[kbps] = (
      float(losses.mel_distance(ref, rec)[0]),
      float(losses.si_sdr(ref, rec)[0]),
    )
  return out


def compare(f32: inference.Codec, bf16: inference.Codec, clips) -> dict:
  same, rel, q32, q16 = [], [], [], []
  for clip in clips:
    x = clip[None]
    a, b = f32.encode(x), bf16.encode(x)
    same.append(a[0] == b[0])  # [frames, levels]
    rel.append(relative_l2(f32.embed(x)[0], bf16.embed(x)[0]))
    q32.append(quality(f32, clip, a))
    q16.append(quality(f32, clip, b))
  same = np.concatenate(same)
  rel = np.concatenate(rel)
  prefix = np.cumprod(same, axis=1).astype(bool)
  levels = same.shape[1]
  per_kbps = {}
  for kbps in KBPS:
    m32 = np.mean([q[kbps][0] for q in q32])
    m16 = np.mean([q[kbps][0] for q in q16])
    s32 = np.mean([q[kbps][1] for q in q32])
    s16 = np.mean([q[kbps][1] for q in q16])
    per_kbps[f'{kbps}kbps'] = {
      'mel_distance_f32_codes': round(float(m32), 4),
      'mel_distance_bf16_codes': round(float(m16), 4),
      'si_sdr_f32_codes': round(float(s32), 3),
      'si_sdr_bf16_codes': round(float(s16), 3),
    }
  return {
    'frames': int(same.shape[0]),
    'embedding_relative_l2': {
      'median': round(float(np.median(rel)), 5),
      'max': round(float(np.max(rel)), 5),
    },
    'prefix_agreement': {
      f'{n} ({f32.levels_to_kbps(n):g} kbps)': round(
        float(prefix[:, n - 1].mean()), 4
      )
      for n in PREFIXES
      if n <= levels
    },
    'level_agreement': [round(float(v), 4) for v in same.mean(0)],
    'quality_of_f32_decode': per_kbps,
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', required=True, help='model directory')
  ap.add_argument('--data', required=True, help='corpus manifest (.jsonl)')
  ap.add_argument('--clip-seconds', type=float, default=20.0)
  args = ap.parse_args(argv)
  f32 = inference.Codec.load(args.model)
  bf16 = inference.Codec(f32.params, f32.config, precision='bfloat16')
  clips = [c.audio for c in clips_lib.load(args.data, args.clip_seconds).clips]
  result = {
    'benchmark': 'bf16_codes',
    'model': args.model,
    'model_id': f32.model_id,
    'clips': len(clips),
    'clip_seconds': args.clip_seconds,
    'jax': jax.__version__,
    **compare(f32, bf16, clips),
  }
  print(json.dumps(result, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
