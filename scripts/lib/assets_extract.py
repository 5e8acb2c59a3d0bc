#!/usr/bin/env python3
"""Small extraction helpers for scripts/fetch-assets.sh (standard library only).

  assets_extract.py zip ARCHIVE DEST MEMBER_GLOB...
      Extract the members of a zip/wheel matching any glob into DEST, keeping
      their paths. Fails when a glob matches nothing.
  assets_extract.py tar ARCHIVE DEST MEMBER_GLOB...
      The same for a (gzipped) tar archive.
  assets_extract.py gutenberg DST_DIR SRC...
      Copy text files into DST_DIR, dropping the Project Gutenberg header and footer when
      they are clearly delimited by "*** START OF" / "*** END OF" lines.
"""

import fnmatch
import os
import shutil
import sys
import tarfile
import zipfile


def _safe_target(dest, name):
    target = os.path.normpath(os.path.join(dest, name))
    root = os.path.normpath(dest)
    if os.path.isabs(name) or not (target == root or target.startswith(root + os.sep)):
        raise SystemExit(f"assets_extract: refusing unsafe member path {name!r}")
    return target


def _pick(names, globs, archive):
    chosen = []
    for pattern in globs:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SystemExit(f"assets_extract: no member of {archive} matches {pattern!r}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def extract_zip(archive, dest, globs):
    with zipfile.ZipFile(archive) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        for name in _pick(names, globs, archive):
            target = _safe_target(dest, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target + ".part", "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(target + ".part", target)


def extract_tar(archive, dest, globs):
    with tarfile.open(archive) as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        for name in _pick(list(members), globs, archive):
            target = _safe_target(dest, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            src = tf.extractfile(members[name])
            with src, open(target + ".part", "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(target + ".part", target)


def gutenberg(src, dst):
    with open(src, "r", encoding="utf-8", errors="replace", newline=None) as handle:
        lines = handle.read().split("\n")
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("*** START OF")), None)
    end = next((i for i, l in enumerate(lines) if l.lstrip().startswith("*** END OF")), None)
    if start is not None and end is not None and start < end:
        lines = lines[start + 1 : end]
    text = "\n".join(lines).strip("\n") + "\n"
    with open(dst + ".part", "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(dst + ".part", dst)


def main(argv):
    if len(argv) >= 5 and argv[1] == "zip":
        extract_zip(argv[2], argv[3], argv[4:])
    elif len(argv) >= 5 and argv[1] == "tar":
        extract_tar(argv[2], argv[3], argv[4:])
    elif len(argv) >= 4 and argv[1] == "gutenberg":
        os.makedirs(argv[2], exist_ok=True)
        for src in argv[3:]:
            gutenberg(src, os.path.join(argv[2], os.path.basename(src)))
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
