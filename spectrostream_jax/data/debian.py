"""Real, freely licensed music for any Debian machine: two game soundtracks.

Debian ships the soundtracks of Endgame: Singularity (singularity-music,
CC-BY-SA-3.0) and Warzone 2100 (warzone2100-music, GPL-2+), about five
hours of stereo Ogg Vorbis and Opus. `fetch` downloads the two packages
with `apt-get download`, checks their SHA-256 against both the values
pinned here and what apt's signed index reports, unpacks them with
`dpkg-deb -x` (no installation, no root), confirms each license from the
package's copyright file, and writes

    OUT_DIR/audio/PACKAGE/...        the tracks
    OUT_DIR/licenses/PACKAGE/...     copyright and upstream license files
    OUT_DIR/manifest.jsonl           one row per track (see below)

Every manifest row has path, split, track, package, version, license,
license_files, sha256, frames, sample_rate, channels and seconds. Tracks
are split into train and eval by track; a track and its remaster
(`track3` and `track3_enhanced`) count as one track, so they stay on the
same side. The corpus is built in a temporary directory and renamed into
place. Never commit it: it is audio, and its licenses have conditions.
"""

import dataclasses
import fnmatch
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

from spectrostream_jax import files as files_lib
from spectrostream_jax.data import index as index_lib


@dataclasses.dataclass(frozen=True)
class DebianPackage:
  name: str
  version: str
  sha256: str
  # SPDX id, confirmed from the package's files at fetch time.
  license: str
  # Unpacked directory that holds the music.
  music_dir: str
  # (file in the package, text it must contain) confirming the license,
  # on top of the `Files: *` stanza of a machine-readable copyright file.
  evidence: tuple[tuple[str, str], ...] = ()
  # Which files of music_dir to take: glob patterns relative to it (all
  # audio files when empty), and the format they must have (any when
  # None); files of another format are left out and counted.
  include: tuple[str, ...] = ()
  sample_rate: int | None = None
  channels: int | None = None
  min_seconds: float = 0.0
  # When the license is stated file by file (stanzas `Files: PREFIX<name>`
  # of the copyright file): PREFIX, and the license's name there. Files
  # without such a stanza of `license` are left out.
  file_stanzas: tuple[str, str] | None = None
  # Files beside the music that state its license, copied with it.
  license_notes: tuple[str, ...] = ('license.txt', 'LICENSE', 'COPYING')
  architecture: str = 'all'

  @property
  def deb(self) -> str:
    return f'{self.name}_{self.version}_{self.architecture}.deb'

  @property
  def copyright(self) -> str:
    return f'usr/share/doc/{self.name}/copyright'


PACKAGES = (
  DebianPackage(
    name='singularity-music',
    version='007-2',
    sha256='139ba1e408eeb0a72f1fff3760ca46558b9f81bed97dc8c0efa108c4007f4845',
    license='CC-BY-SA-3.0',
    music_dir='usr/share/games/singularity/music',
    evidence=(
      ('usr/share/doc/singularity-music/copyright', 'CREATIVE COMMONS PUBLIC'),
      ('usr/share/doc/singularity-music/copyright', 'Attribution, ShareAlike'),
      ('usr/share/doc/singularity-music/README', 'BY-SA 3.0 license'),
    ),
  ),
  DebianPackage(
    name='warzone2100-music',
    version='4.3.3-3',
    sha256='d3b2c9f90ea5438d45d4aff18339a03ec808e1affa9dac91f7dad61cb15ee64e',
    license='GPL-2+',
    music_dir='usr/share/games/warzone2100/music',
  ),
)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def dep5_license(text: str, files: str = '*') -> str | None:
  """License of the stanza for `files` in a machine-readable copyright."""
  for stanza in text.split('\n\n'):
    fields = {}
    for line in stanza.splitlines():
      if line and not line[0].isspace() and ':' in line:
        key, value = line.split(':', 1)
        fields[key.strip()] = value.strip()
    if fields.get('Files') == files:
      return fields.get('License')
  return None


def confirm_license(package: DebianPackage, root: pathlib.Path) -> None:
  """Raises DataError unless the unpacked package states its license."""
  text = (root / package.copyright).read_text(encoding='utf-8')
  if package.file_stanzas:
    if not text.startswith('Format:'):
      raise index_lib.DataError(
        f'{package.name}: its copyright file is no longer machine-readable'
      )
  elif text.startswith('Format:'):
    found = dep5_license(text)
    if found != package.license:
      raise index_lib.DataError(
        f'{package.name}: copyright says {found!r}, expected '
        f'{package.license!r}; check the package before using it'
      )
  elif not package.evidence:
    raise index_lib.DataError(f'{package.name}: cannot confirm its license')
  for name, phrase in package.evidence:
    if phrase not in (root / name).read_text(encoding='utf-8'):
      raise index_lib.DataError(
        f'{package.name}: {name} lacks {phrase!r}; the license may have changed'
      )


def _run(args: list[str], cwd: str | None = None) -> str:
  try:
    done = subprocess.run(
      args, cwd=cwd, capture_output=True, text=True, check=False
    )
  except FileNotFoundError:
    raise index_lib.DataError(
      f'{args[0]} not found: this needs a Debian or Ubuntu machine'
    ) from None
  if done.returncode:
    last = (done.stderr.strip() or done.stdout.strip()).splitlines()
    raise index_lib.DataError(
      f'{" ".join(args)} failed: {last[-1] if last else done.returncode}'
    )
  return done.stdout


def apt_sha256(package: DebianPackage, pinned: bool) -> tuple[str, str]:
  """(file name, SHA-256) that apt will download for `package`."""
  try:
    out = _run(['apt-get', 'download', '--print-uris', package.name])
  except index_lib.DataError as e:
    raise index_lib.DataError(
      f'{e}; if apt does not know {package.name}, run `apt-get update`'
    ) from None
  for line in out.splitlines():
    parts = line.split()
    if len(parts) == 4 and parts[3].startswith('SHA256:'):
      name, digest = parts[1], parts[3].removeprefix('SHA256:')
      if pinned and (name, digest) != (package.deb, package.sha256):
        raise index_lib.DataError(
          f'apt offers {name} ({digest}), this tool pins {package.deb} '
          f'({package.sha256}); pass --unpinned to trust apt alone'
        )
      return name, digest
  raise index_lib.DataError(f'apt gave no SHA256 for {package.name}: {out!r}')


def download(package: DebianPackage, directory: str, pinned: bool) -> str:
  """Downloads the .deb into `directory` and returns its verified path."""
  name, digest = apt_sha256(package, pinned)
  _run(['apt-get', 'download', package.name], cwd=directory)
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise index_lib.DataError(f'apt-get download wrote no {name}')
  actual = sha256_of(path)
  if actual != digest:
    raise index_lib.DataError(
      f"{name}: SHA-256 {actual} differs from apt's {digest}"
    )
  return path


def _version_of(deb_name: str) -> str:
  return deb_name.split('_')[1]


def _track_group(package: str, audio: pathlib.Path) -> str:
  """Split key: a remaster (`X_enhanced`) belongs with its original `X`."""
  return f'{package}/{audio.stem.removesuffix("_enhanced")}'


def fetch(
  out_dir: str,
  eval_fraction: float = 0.1,
  seed: int = 0,
  pinned: bool = True,
  keep_debs: bool = False,
  overwrite: bool = False,
  packages: tuple[DebianPackage, ...] = PACKAGES,
  split: str | None = None,
) -> dict[str, Any]:
  """Builds the corpus in `out_dir`; returns a summary of what it holds.

  Tracks are split into train and eval by `eval_fraction`, or all go to
  `split` when it is given.
  """
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise index_lib.DataError(
      f'{out} is not empty (pass --overwrite to replace it)'
    )
  with files_lib.atomic_dir(out, overwrite=overwrite) as work:
    rows, left_out = [], {}
    for package in packages:
      found, left_out[package.name] = _fetch_package(package, work, pinned)
      rows += found
    if not keep_debs:
      shutil.rmtree(work / 'debs')
    if split is None:
      groups = index_lib.assign_splits(
        [r['track'] for r in rows], eval_fraction, seed
      )
    else:
      groups = dict.fromkeys((r['track'] for r in rows), split)
    for row in rows:
      row['split'] = groups[row['track']]
    (work / 'manifest.jsonl').write_text(
      ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows),
      encoding='utf-8',
    )
  summary = summarize(rows, str(out), packages)
  for name, files in left_out.items():
    summary['packages'][name]['left_out'] = files
  return summary


def _file_license(
  package: DebianPackage, copyright_text: str, rel: pathlib.Path
) -> str | None:
  """The file's license, or None when it is not stated as expected."""
  if package.file_stanzas is None:
    return package.license
  prefix, name = package.file_stanzas
  found = dep5_license(copyright_text, f'{prefix}{rel}')
  return package.license if found == name else None


def _wanted(package: DebianPackage, rel: pathlib.Path) -> bool:
  if rel.suffix.lower() not in index_lib.AUDIO_SUFFIXES:
    return False
  return not package.include or any(
    fnmatch.fnmatchcase(str(rel), p) for p in package.include
  )


def _fetch_package(
  package: DebianPackage, work: pathlib.Path, pinned: bool
) -> tuple[list[dict[str, Any]], int]:
  """Downloads, checks and unpacks one package.

  Returns its manifest rows and the number of audio files left out for
  their format, length or license.
  """
  debs = work / 'debs'
  debs.mkdir(exist_ok=True)
  deb = download(package, str(debs), pinned)
  unpacked = work / 'unpacked' / package.name
  unpacked.mkdir(parents=True)
  _run(['dpkg-deb', '-x', deb, str(unpacked)])
  confirm_license(package, unpacked)
  version = _version_of(os.path.basename(deb))
  licenses = work / 'licenses' / package.name
  licenses.mkdir(parents=True)
  shutil.copy(unpacked / package.copyright, licenses / 'copyright')
  music = unpacked / package.music_dir
  for note in sorted(music.rglob('*')):
    if note.name in package.license_notes:
      target = licenses / note.relative_to(music)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(note, target)
  copyright_text = (unpacked / package.copyright).read_text(encoding='utf-8')
  rows, left_out = [], 0
  for audio in sorted(music.rglob('*')):
    rel = audio.relative_to(music)
    if not _wanted(package, rel):
      continue
    probe = index_lib.probe(str(audio))
    if probe.reason:
      raise index_lib.DataError(f'{audio}: {probe.reason} {probe.detail}')
    if (
      (package.sample_rate or probe.sample_rate) != probe.sample_rate
      or (package.channels or probe.channels) != probe.channels
      or probe.frames < package.min_seconds * probe.sample_rate
      or _file_license(package, copyright_text, rel) is None
    ):
      left_out += 1
      continue
    target = work / 'audio' / package.name / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(audio, target)
    license_files = [f'licenses/{package.name}/copyright']
    license_files += [
      f'licenses/{package.name}/{rel.parent / name}'
      for name in package.license_notes
      if (licenses / rel.parent / name).is_file()
    ]
    rows.append(
      {
        'path': str(target.relative_to(work)),
        'track': _track_group(package.name, rel),
        'package': package.name,
        'version': version,
        'license': package.license,
        'license_files': license_files,
        'sha256': sha256_of(str(target)),
        'frames': probe.frames,
        'sample_rate': probe.sample_rate,
        'channels': probe.channels,
        'seconds': round(probe.frames / probe.sample_rate, 3),
      }
    )
  shutil.rmtree(work / 'unpacked')
  return rows, left_out


def summarize(
  rows: list[dict[str, Any]],
  out_dir: str,
  packages: tuple[DebianPackage, ...] = PACKAGES,
) -> dict[str, Any]:
  """Tracks and minutes in total, per split and per package."""

  def stats(selected: list[dict[str, Any]]) -> dict[str, Any]:
    return {
      'files': len(selected),
      'tracks': len({r['track'] for r in selected}),
      'minutes': round(sum(r['seconds'] for r in selected) / 60, 2),
    }

  return {
    'out_dir': out_dir,
    'manifest': os.path.join(out_dir, 'manifest.jsonl'),
    **stats(rows),
    'splits': {
      s: stats([r for r in rows if r['split'] == s]) for s in ('train', 'eval')
    },
    'packages': {
      p.name: {
        **stats([r for r in rows if r['package'] == p.name]),
        'license': p.license,
        'version': next(
          (r['version'] for r in rows if r['package'] == p.name), None
        ),
      }
      for p in packages
    },
  }
