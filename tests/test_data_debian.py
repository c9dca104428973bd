"""The Debian corpora (soundtracks; lossless loops), with apt faked.

The real fetch is run by hand: `spectrostream-data fetch-debian-music DIR`
(docs/data.md lists what it produced on the development machine).
"""

import hashlib
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax.data import debian
from spectrostream_jax.data import index as index_lib
from spectrostream_jax.data import lossless

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: Warzone 2100

Files: *
Copyright: 1999-2004, Eidos Interactive
License: GPL-2+

Files: icons/warzone2100.appdata.xml
Copyright: Warzone 2100 Project
License: CC0-1.0
 See /usr/share/common-licenses/CC0-1.0 for more information.
"""
SINGULARITY, WARZONE = debian.PACKAGES


def test_dep5_license():
  assert debian.dep5_license(DEP5) == 'GPL-2+'
  assert debian.dep5_license(DEP5, 'icons/warzone2100.appdata.xml') == (
    'CC0-1.0'
  )
  assert debian.dep5_license('Format: x\n\nFiles: a/*\nLicense: MIT\n') is None


def _write(root: pathlib.Path, name: str, text: str) -> None:
  (root / name).parent.mkdir(parents=True, exist_ok=True)
  (root / name).write_text(text)


def test_confirm_license(tmp_path):
  _write(tmp_path, WARZONE.copyright, DEP5)
  debian.confirm_license(WARZONE, tmp_path)
  _write(tmp_path, WARZONE.copyright, DEP5.replace('GPL-2+', 'GPL-3+', 1))
  with pytest.raises(index_lib.DataError, match='GPL-3'):
    debian.confirm_license(WARZONE, tmp_path)
  cc = 'CREATIVE COMMONS PUBLIC LICENSE ... Attribution, ShareAlike.'
  _write(tmp_path, SINGULARITY.copyright, cc)
  _write(
    tmp_path, 'usr/share/doc/singularity-music/README', 'BY-SA 3.0 license'
  )
  debian.confirm_license(SINGULARITY, tmp_path)
  _write(tmp_path, 'usr/share/doc/singularity-music/README', 'all rights')
  with pytest.raises(index_lib.DataError, match='README'):
    debian.confirm_license(SINGULARITY, tmp_path)


def _fake_apt(monkeypatch, payload: bytes, offered: str, digest: str):
  def run(args, cwd=None):
    if '--print-uris' in args:
      return (
        f"'http://deb/{offered}' {offered} {len(payload)} SHA256:{digest}\n"
      )
    pathlib.Path(cwd, offered).write_bytes(payload)
    return ''

  monkeypatch.setattr(debian, '_run', run)


def test_download_checks_pin_and_hash(tmp_path, monkeypatch):
  payload = b'not really a deb'
  good = hashlib.sha256(payload).hexdigest()
  package = debian.DebianPackage('x', '1-1', good, 'MIT', 'usr')
  _fake_apt(monkeypatch, payload, package.deb, good)
  path = debian.download(package, str(tmp_path), pinned=True)
  assert debian.sha256_of(path) == good
  # A newer version in apt: refused unless unpinned.
  _fake_apt(monkeypatch, payload, 'x_2-1_all.deb', good)
  with pytest.raises(index_lib.DataError, match='--unpinned'):
    debian.download(package, str(tmp_path), pinned=True)
  assert debian.download(package, str(tmp_path), pinned=False).endswith(
    'x_2-1_all.deb'
  )
  # The file apt wrote does not hash to what apt's index says.
  _fake_apt(monkeypatch, payload, package.deb, '0' * 64)
  with pytest.raises(index_lib.DataError, match='pins'):
    debian.download(package, str(tmp_path), pinned=True)
  with pytest.raises(index_lib.DataError, match='differs'):
    debian.download(package, str(tmp_path), pinned=False)


def _build_deb(package, workdir: pathlib.Path, tracks: list[str]) -> str:
  """A real .deb with generated tracks and the package's license files."""
  root = workdir / package.name
  (root / 'DEBIAN').mkdir(parents=True)
  (root / 'DEBIAN/control').write_text(
    f'Package: {package.name}\nVersion: {package.version}\n'
    'Architecture: all\nMaintainer: test <t@example.org>\n'
    'Description: test\n'
  )
  if package is WARZONE:
    _write(root, package.copyright, DEP5)
    _write(root, f'{package.music_dir}/albums/a/license.txt', 'CC-BY-SA-3.0')
  else:
    _write(
      root, package.copyright, 'CREATIVE COMMONS PUBLIC Attribution, ShareAlike'
    )
    _write(root, 'usr/share/doc/singularity-music/README', 'BY-SA 3.0 license')
  rng = np.random.default_rng(len(tracks))
  for track in tracks:
    path = root / package.music_dir / track
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * rng.standard_normal((24_000, 2)), 48_000, format='OGG')
  deb = workdir / package.deb
  subprocess.run(
    ['dpkg-deb', '--build', '--root-owner-group', str(root), str(deb)],
    check=True,
    capture_output=True,
  )
  return str(deb)


@pytest.mark.skipif(not shutil.which('dpkg-deb'), reason='needs dpkg-deb')
def test_fetch_builds_a_split_licensed_manifest(tmp_path, monkeypatch):
  contents = {
    SINGULARITY.name: ['A.ogg', 'B.ogg', 'win/C.ogg'],
    WARZONE.name: [
      'menu.opus',
      'albums/a/menu_enhanced.opus',
      'albums/a/t1.opus',
    ],
  }
  built = tmp_path / 'built'
  built.mkdir()

  def fake_download(package, directory, pinned):
    del pinned
    deb = _build_deb(package, built, contents[package.name])
    return shutil.copy(deb, directory)

  monkeypatch.setattr(debian, 'download', fake_download)
  out = tmp_path / 'music'
  summary = debian.fetch(str(out), eval_fraction=0.3)
  rows = [
    json.loads(x) for x in (out / 'manifest.jsonl').read_text().splitlines()
  ]
  assert summary['files'] == 6 and summary['tracks'] == 5
  assert summary['splits']['eval']['tracks'] == 2  # round(5 · 0.3)
  assert sorted(p.name for p in out.iterdir()) == [
    'audio',
    'licenses',
    'manifest.jsonl',
  ]
  by_path = {r['path']: r for r in rows}
  menu = by_path['audio/warzone2100-music/menu.opus']
  enhanced = by_path['audio/warzone2100-music/albums/a/menu_enhanced.opus']
  assert menu['track'] == enhanced['track'] == 'warzone2100-music/menu'
  assert menu['split'] == enhanced['split']
  assert enhanced['license'] == 'GPL-2+'
  assert enhanced['license_files'] == [
    'licenses/warzone2100-music/copyright',
    'licenses/warzone2100-music/albums/a/license.txt',
  ]
  single = by_path['audio/singularity-music/win/C.ogg']
  assert (single['package'], single['version'], single['license']) == (
    'singularity-music',
    '007-2',
    'CC-BY-SA-3.0',
  )
  for row in rows:
    audio = out / row['path']
    assert debian.sha256_of(str(audio)) == row['sha256']
    assert row['frames'] == sf.info(audio).frames == 24_000
    for name in row['license_files']:
      assert (out / name).is_file()
  # The manifest is a corpus spec, and its splits are honoured.
  train = index_lib.select(
    index_lib.scan(str(out / 'manifest.jsonl'), str(tmp_path / 'cache')),
    min_frames=lambda rate: 1,
    split='train',
  )
  assert {f.path for f in train.files} == {
    str(out / r['path']) for r in rows if r['split'] == 'train'
  }
  with pytest.raises(index_lib.DataError, match='not empty'):
    debian.fetch(str(out))
  # A failed rebuild keeps the corpus; a good one replaces it whole.
  manifest = (out / 'manifest.jsonl').read_text()

  def broken_download(package, directory, pinned):
    raise index_lib.DataError('offline')

  monkeypatch.setattr(debian, 'download', broken_download)
  with pytest.raises(index_lib.DataError, match='offline'):
    debian.fetch(str(out), overwrite=True)
  assert (out / 'manifest.jsonl').read_text() == manifest
  monkeypatch.setattr(debian, 'download', fake_download)
  shutil.rmtree(built)
  built.mkdir()
  debian.fetch(str(out), overwrite=True, split='eval')
  rows = [
    json.loads(x) for x in (out / 'manifest.jsonl').read_text().splitlines()
  ]
  assert {r['split'] for r in rows} == {'eval'}
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


SONIC = lossless.PACKAGES[0]
SONIC_COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: Sonic Pi

Files: *
Copyright: 2016 Samuel Aaron
License: MIT

Files: etc/samples/loop_a.flac
Copyright: 2013 someone
License: CC0

Files: etc/samples/ambi_b.flac
Copyright: 2013 someone
License: CC0

Files: etc/samples/guit_mono.flac
Copyright: 2013 someone
License: CC0

Files: etc/samples/bass_short.flac
Copyright: 2013 someone
License: CC0

Files: etc/samples/bd_kick.flac
Copyright: 2013 someone
License: CC0
"""


@pytest.mark.skipif(not shutil.which('dpkg-deb'), reason='needs dpkg-deb')
def test_lossless_fetch_takes_licensed_stereo_music_only(tmp_path, monkeypatch):
  """Per-file CC0 stanzas, stereo, >= 1 s, musical names; all 'eval'."""
  root = tmp_path / 'pkg'
  (root / 'DEBIAN').mkdir(parents=True)
  (root / 'DEBIAN/control').write_text(
    f'Package: {SONIC.name}\nVersion: {SONIC.version}\nArchitecture: all\n'
    'Maintainer: test <t@example.org>\nDescription: test\n'
  )
  _write(root, SONIC.copyright, SONIC_COPYRIGHT)
  _write(
    root, SONIC.evidence[0][0], f'All samples have been {SONIC.evidence[0][1]}'
  )
  rng = np.random.default_rng(0)
  files = {
    'loop_a.flac': (2.0, 2),  # taken
    'ambi_b.flac': (1.2, 2),  # taken
    'loop_nostanza.flac': (2.0, 2),  # only `Files: *` (MIT): left out
    'guit_mono.flac': (2.0, 1),  # mono: left out
    'bass_short.flac': (0.5, 2),  # under a second: left out
    'bd_kick.flac': (2.0, 2),  # a drum hit, not in `include`: ignored
  }
  for name, (seconds, channels) in files.items():
    sf.write(
      root / SONIC.music_dir / name,
      0.1 * rng.standard_normal((int(seconds * 44_100), channels)),
      44_100,
    )
  deb = tmp_path / SONIC.deb
  subprocess.run(
    ['dpkg-deb', '--build', '--root-owner-group', str(root), str(deb)],
    check=True,
    capture_output=True,
  )

  def fake_download(package, directory, pinned):
    del pinned
    assert package is SONIC
    return shutil.copy(deb, directory)

  monkeypatch.setattr(debian, 'download', fake_download)
  out = tmp_path / 'lossless'
  summary = lossless.fetch(str(out))
  rows = [
    json.loads(x) for x in (out / 'manifest.jsonl').read_text().splitlines()
  ]
  assert [r['path'] for r in rows] == [
    'audio/sonic-pi-samples/ambi_b.flac',
    'audio/sonic-pi-samples/loop_a.flac',
  ]
  assert {r['split'] for r in rows} == {'eval'}
  assert {r['license'] for r in rows} == {'CC0-1.0'}
  assert rows[0]['license_files'] == [
    'licenses/sonic-pi-samples/copyright',
    'licenses/sonic-pi-samples/README.md',
  ]
  assert (rows[0]['sample_rate'], rows[0]['channels']) == (44_100, 2)
  assert summary['splits']['eval']['files'] == 2
  assert summary['packages'][SONIC.name]['left_out'] == 3
  # A README that no longer says CC0 stops the fetch.
  _write(root, SONIC.evidence[0][0], 'All rights reserved')
  subprocess.run(
    ['dpkg-deb', '--build', '--root-owner-group', str(root), str(deb)],
    check=True,
    capture_output=True,
  )
  with pytest.raises(index_lib.DataError, match='README'):
    lossless.fetch(str(tmp_path / 'again'))
