"""Runs every benchmark with its docs flag: regenerates docs/benchmarks.md.

    python benchmarks/run_all.py [--dry-run] [--only codec_speed,streaming]
        [--args 'codec_speed=--repeats 3'] [--keep-going]

Each script in benchmarks/ (helpers and the official-implementation
runner excepted) runs from the repository root, one after another, with
the flag that makes it rewrite its own section of docs/benchmarks.md:
`--update-docs` for the argparse scripts, `--update_docs` for the absl
ones, read from the script's source. A script without such a flag still
runs; its figures reach only its output. Runs stop at the first failure
unless --keep-going; the exit status is non-zero if any failed.
"""

import argparse
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = ROOT / 'benchmarks'
# Helpers, this runner, and the script codec_speed.py runs itself with
# --official-python.
NOT_BENCHMARKS = ('__init__', 'report', 'run_all', 'official_codec_speed')


def benchmarks() -> list[str]:
  return sorted(
    p.stem for p in HERE.glob('*.py') if p.stem not in NOT_BENCHMARKS
  )


def docs_flag(name: str) -> str | None:
  """The flag with which `name` writes its docs section, if it has one."""
  source = (HERE / f'{name}.py').read_text(encoding='utf-8')
  if "'--update-docs'" in source:
    return '--update-docs'
  if "'update_docs'" in source:
    return '--update_docs'
  return None


def command(name: str, extra: str, python: str) -> list[str]:
  flag = docs_flag(name)
  # A relative path: the docs record the command as it was typed.
  args = [python, f'benchmarks/{name}.py', *shlex.split(extra)]
  return args + ([flag] if flag else [])


def _extra_args(pairs: list[str], known: list[str]) -> dict[str, str]:
  extra = {}
  for pair in pairs:
    name, sep, args = pair.partition('=')
    if not sep or name not in known:
      raise SystemExit(
        f'run_all: error: --args wants NAME=ARGS with NAME in {known}, '
        f'got {pair!r}'
      )
    extra[name] = args
  return extra


def main(argv: list[str] | None = None) -> int:
  found = benchmarks()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--dry-run', action='store_true', help='print, run nothing')
  ap.add_argument(
    '--only', default='', help=f'comma-separated subset of {found}'
  )
  ap.add_argument(
    '--args',
    action='append',
    default=[],
    metavar='NAME=ARGS',
    help="extra arguments of one benchmark, e.g. 'codec_speed=--repeats 3'",
  )
  ap.add_argument('--keep-going', action='store_true')
  ap.add_argument(
    '--python', default=sys.executable, help='interpreter (default: this one)'
  )
  args = ap.parse_args(argv)
  chosen = [n for n in args.only.split(',') if n] or found
  unknown = sorted(set(chosen) - set(found))
  if unknown:
    ap.error(f'unknown benchmarks {unknown}; found {found}')
  extra = _extra_args(args.args, found)

  failed = []
  for name in chosen:
    cmd = command(name, extra.get(name, ''), args.python)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
      continue
    if docs_flag(name) is None:
      print(f'  note: {name} has no docs flag; docs unchanged', flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    took = time.perf_counter() - start
    print(f'  {name}: exit {code} after {took:.0f} s', flush=True)
    if code:
      failed.append(name)
      if not args.keep_going:
        break
  if failed:
    print(f'run_all: failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
