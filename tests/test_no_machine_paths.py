"""Nothing the project ships or commits names a path of the machine it was made on.

Shipped bundles (every ``config.json`` bundle under ``src/`` and ``tests/``, their READMEs,
metrics and the metadata of their weight files; the packaged weights), committed results (``bench/results``), the
bench scripts, ``docs/`` and ``README.md`` must refer to data and runs by name, count and
content hash, or by paths relative to the repository.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: An absolute path into a home, work or temp folder (POSIX) or onto a drive (Windows), starting
#: a token: ``https://x.org/home/`` (a URL) or ``runs/tmp/`` (relative) do not count.
MACHINE_PATH = re.compile(r"(?<![\w/:.~-])(?:/(?:work|tmp|home|Users|root|mnt|private/var|var/folders)/"
                          r"|[A-Za-z]:\\\\?[\w.-]+\\)")


def machine_paths(text: str) -> list[str]:
    """The lines of ``text`` that name a machine path."""
    return [line.strip() for line in text.splitlines() if MACHINE_PATH.search(line)]


def _committed(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--", *patterns], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist): walk the tree
        return sorted(p for pat in patterns for p in REPO.glob(pat.replace("**", "**/*")) if p.is_file())
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def _safetensors_metadata(path: Path) -> str:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return json.dumps(header.get("__metadata__") or {})


def _bundle_dirs() -> list[Path]:
    dirs = []
    for config in (REPO / "src").rglob("config.json"):
        if '"kind"' in config.read_text(errors="replace"):
            dirs.append(config.parent)
    for config in _committed("tests/**/config.json"):
        dirs.append(config.parent)
    return sorted(set(dirs))


def _texts() -> list[tuple[Path, str]]:
    files = _committed("README.md", "docs/**", "bench/*.py", "bench/results/**", "src/**/*.safetensors")
    for bundle in _bundle_dirs():
        files += [p for p in bundle.rglob("*") if p.is_file()]
    out = []
    for path in sorted(set(files)):
        if path.suffix == ".safetensors":
            out.append((path, _safetensors_metadata(path)))
            continue
        try:
            out.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:  # images, ONNX graphs: no text to check
            continue
    return out


def test_the_default_model_is_checked():
    assert REPO / "src" / "hematoscope" / "default_model" in _bundle_dirs()


@pytest.mark.parametrize("path,text", [pytest.param(p, t, id=str(p.relative_to(REPO))) for p, t in _texts()])
def test_no_machine_paths(path, text):
    assert not machine_paths(text), f"{path.relative_to(REPO)} names machine paths: {machine_paths(text)[:3]}"


def test_the_pattern():
    for bad in ('"data": "/work/shared/data/pbc"', "--out /tmp/run", "C:\\Users\\lab\\cells", "(/home/me/x)",
                "`/Users/me/x.csv`"):
        assert machine_paths(bad), bad
    for fine in ("https://example.org/home/page", "runs/tmp/x", "../shared/data/pbc", "/shared/models/pbc",
                 "a/b/c", "ratio 1/2", "~/work/x"):
        assert not machine_paths(fine), fine
