"""Runs a console command the way its installed script would.

The argv imports the entry point that pyproject.toml's [project.scripts]
names, from the tree under test, so the same test also runs an older
tree's entry point (how issue 19's tests were shown to fail before).
"""

import pathlib
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def command(name: str) -> list[str]:
  """argv that runs console script `name` as pyproject.toml declares it."""
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    target = tomllib.load(f)['project']['scripts'][name]
  module, func = target.split(':')
  code = (
    f'import importlib, sys; m = importlib.import_module({module!r}); '
    f'sys.exit(getattr(m, {func!r})())'
  )
  return [sys.executable, '-c', code]
