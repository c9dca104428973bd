"""`spectrostream-data`: check a corpus, convert it, or fetch real music.

    spectrostream-data scan DIR_OR_GLOB_OR_MANIFEST
    spectrostream-data build DIR_OR_GLOB_OR_MANIFEST OUT_DIR
    spectrostream-data fetch-debian-music OUT_DIR
    spectrostream-data fetch-lossless-music OUT_DIR

Each prints a JSON summary on stdout and exits 0; skipped files are part
of the summary, not a failure. A mistake (a missing path, an empty
corpus, a bad option) prints one line on stderr and exits non-zero: a
traceback is only ever a bug.
"""

import argparse
import json
import os
import sys
from typing import Any

from spectrostream_jax import channels
from spectrostream_jax import commands as commands_lib
from spectrostream_jax.data import arrayrecord
from spectrostream_jax.data import debian
from spectrostream_jax.data import index as index_lib
from spectrostream_jax.data import lossless
from spectrostream_jax.data import transforms


def _scan(args: argparse.Namespace) -> dict[str, Any]:
  index = index_lib.select(
    index_lib.scan(args.corpus, args.cache_dir, args.workers),
    min_frames=lambda rate: round(args.min_seconds * rate),
    min_sample_rate=args.min_sample_rate,
  )
  return index.summary()


def _build(args: argparse.Namespace) -> dict[str, Any]:
  config = arrayrecord.BuildConfig(
    name=args.name,
    version=args.version,
    sample_rate=args.sample_rate,
    num_channels=args.channels,
    channel_mode=args.channel_mode,
    segment_seconds=args.segment_seconds,
    min_segment_seconds=args.min_segment_seconds,
    eval_fraction=args.eval_fraction,
    seed=args.seed,
    min_sample_rate=args.min_sample_rate,
    shard_megabytes=args.shard_mb,
    workers=args.workers,
  )
  return arrayrecord.build(
    args.corpus, args.out_dir, config, args.cache_dir, args.overwrite
  )


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
  return debian.fetch(
    args.out_dir,
    eval_fraction=args.eval_fraction,
    seed=args.seed,
    pinned=not args.unpinned,
    keep_debs=args.keep_debs,
    overwrite=args.overwrite,
  )


def _fetch_lossless(args: argparse.Namespace) -> dict[str, Any]:
  return lossless.fetch(
    args.out_dir,
    pinned=not args.unpinned,
    keep_debs=args.keep_debs,
    overwrite=args.overwrite,
  )


def _parser() -> commands_lib.Parser:
  crop = transforms.AudioConfig().crop_seconds
  build = arrayrecord.BuildConfig()
  parser = commands_lib.Parser(
    prog='spectrostream-data',
    description='Audio corpus tools of spectrostream_jax (see docs/data.md).',
  )
  commands_lib.add_version(parser, parser.prog)
  commands = parser.add_subparsers(dest='command', required=True)

  def corpus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
      'corpus', help='directory, glob (quoted) or .jsonl/.csv manifest'
    )
    p.add_argument('--cache-dir', help='index cache (default ~/.cache/...)')
    p.add_argument(
      '--workers', type=int, default=os.cpu_count() or 1, help='threads'
    )
    p.add_argument('--min-sample-rate', type=int, default=0)

  scan = commands.add_parser('scan', help='check every file, print a summary')
  corpus_options(scan)
  scan.add_argument(
    '--min-seconds',
    type=float,
    default=crop,
    help=f'shorter files are skipped (default: one crop, {crop} s)',
  )
  scan.set_defaults(run=_scan)

  conv = commands.add_parser('build', help='write a TFDS ArrayRecord dataset')
  corpus_options(conv)
  conv.add_argument('out_dir', help='TFDS data_dir to write into')
  conv.add_argument('--name', default=build.name)
  conv.add_argument('--version', default=build.version)
  conv.add_argument('--sample-rate', type=int, default=build.sample_rate)
  conv.add_argument('--channels', type=int, default=2, choices=(1, 2))
  conv.add_argument(
    '--channel-mode', default='downmix', choices=channels.CHANNEL_MODES
  )
  conv.add_argument(
    '--segment-seconds', type=float, default=build.segment_seconds
  )
  conv.add_argument(
    '--min-segment-seconds', type=float, default=build.min_segment_seconds
  )
  conv.add_argument('--eval-fraction', type=float, default=build.eval_fraction)
  conv.add_argument('--seed', type=int, default=0, help='of the track split')
  conv.add_argument('--shard-mb', type=int, default=build.shard_megabytes)
  conv.add_argument('--overwrite', action='store_true')
  conv.set_defaults(run=_build)

  fetch = commands.add_parser(
    'fetch-debian-music', help='download and split two Debian soundtracks'
  )
  fetch.add_argument('out_dir', help='directory to create')
  fetch.add_argument('--eval-fraction', type=float, default=0.1)
  fetch.add_argument('--seed', type=int, default=0, help='of the track split')
  fetch.add_argument(
    '--unpinned',
    action='store_true',
    help="accept apt's newer package versions (checked against apt only)",
  )
  fetch.add_argument('--keep-debs', action='store_true')
  fetch.add_argument('--overwrite', action='store_true')
  fetch.set_defaults(run=_fetch)

  exact = commands.add_parser(
    'fetch-lossless-music',
    help="download Sonic Pi's lossless CC0 loops: an eval-only corpus",
  )
  exact.add_argument('out_dir', help='directory to create')
  exact.add_argument(
    '--unpinned',
    action='store_true',
    help="accept apt's newer package version (checked against apt only)",
  )
  exact.add_argument('--keep-debs', action='store_true')
  exact.add_argument('--overwrite', action='store_true')
  exact.set_defaults(run=_fetch_lossless)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one sub-command; the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    result = args.run(args)
  except (index_lib.DataError, OSError) as e:
    print(f'{parser.prog} {args.command}: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'{parser.prog} {args.command}: interrupted', file=sys.stderr)
    return 130
  json.dump(result, sys.stdout, indent=1, ensure_ascii=False)
  print()
  return 0


if __name__ == '__main__':
  sys.exit(main())
