"""Lossless music from Debian, for evaluation: Sonic Pi's recorded loops.

The training corpus of `debian.py` is Ogg Vorbis and Opus at about
48 kbps: as a reference it carries a lossy codec's band limit and
artefacts, and no codec can be judged above its quality. This corpus is
lossless: the stereo loops and phrases that Sonic Pi ships as 16-bit
FLAC (package `sonic-pi-samples`), recordings of drum breaks, tabla,
guitar, piano, choir, bass and ambient textures from freesound.org,
each dedicated to the public domain (CC0), as the package's copyright
file states file by file. 25 stereo files of 1.5 to 10.7 s, 2.2 minutes.

They are 44.1 kHz: Debian's main archive has no lossless 48 kHz stereo
music worth the name (a search of every `.flac`, `.wav`, `.aiff` and
`.wv` file it ships found 48 kHz stereo only in game sound effects of a
second or two, and one 8-bit track). The evaluation reads them at
48 kHz through soxr, as it reads any file; nothing is lost below
22 kHz, above every codec's band at the rates of the ladder.

`fetch` uses `debian.py`'s machinery: `apt-get download`, SHA-256
pinned and checked against apt's signed index, `dpkg-deb -x`, the
license confirmed for every file taken (files without their own CC0
stanza are left out), and a manifest whose rows all have split 'eval'.
"""

from typing import Any

from spectrostream_jax.data import debian

PACKAGES = (
  debian.DebianPackage(
    name='sonic-pi-samples',
    version='3.2.2~repack-8',
    sha256='25f2312d2fae005e6ad0f4726b8ed3084e776006a5a132083506e960224ac79d',
    license='CC0-1.0',
    music_dir='usr/share/sonic-pi/samples',
    evidence=(
      (
        'usr/share/sonic-pi/samples/README.md',
        'placed in the public domain via the Creative Commons 0 License',
      ),
    ),
    # Musical material: loops, ambient phrases, guitar, bass. Left out:
    # single drum hits, glitches, effects and vinyl noise.
    include=('loop_*.flac', 'ambi_*.flac', 'guit_*.flac', 'bass_*.flac'),
    channels=2,
    min_seconds=1.0,
    file_stanzas=('etc/samples/', 'CC0'),
    license_notes=('README.md',),
  ),
)


def fetch(
  out_dir: str,
  pinned: bool = True,
  keep_debs: bool = False,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Builds the lossless eval corpus in `out_dir`; a summary of it."""
  return debian.fetch(
    out_dir,
    pinned=pinned,
    keep_debs=keep_debs,
    overwrite=overwrite,
    packages=PACKAGES,
    split='eval',
  )
