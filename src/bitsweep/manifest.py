"""sha256 manifests (``sha256sum -c`` format) and small JSON sidecars written beside every artifact."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bitsweep.errors import SourceError

MANIFEST = "manifest.sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_lines(folder: str | Path, exclude: tuple[str, ...] = (), hidden: bool = True) -> list[str]:
    """``sha256  relative/path`` for every file under ``folder`` (sorted), ``sha256sum -c`` format."""
    folder = Path(folder)
    return [
        f"{sha256_file(path)}  {path.relative_to(folder).as_posix()}"
        for path in sorted(p for p in folder.rglob("*") if p.is_file())
        if path.relative_to(folder).as_posix() not in exclude and (hidden or not path.name.startswith("."))
    ]


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's manifest lines (hidden files, such as Snakemake's
    .snakemake_timestamp in directory outputs, left out)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    listing = "".join(line + "\n" for line in manifest_lines(path, hidden=False))
    return hashlib.sha256(listing.encode()).hexdigest()


def write_manifest(folder: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> Path:
    """Hash every file under ``folder`` into ``folder/manifest.sha256`` (sorted, relative paths)."""
    folder = Path(folder)
    lines = manifest_lines(folder, exclude)
    out = folder / MANIFEST
    out.write_text("\n".join(lines) + "\n")
    return out


def verify_manifest(folder: str | Path) -> None:
    """Raise :class:`SourceError` naming the first file that is missing or differs from the manifest."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise SourceError(f"{folder}: no {MANIFEST}; refusing to use unverified files")
    for line in manifest.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        path = folder / rel
        if not path.is_file():
            raise SourceError(f"{path}: listed in {manifest} but missing")
        if sha256_file(path) != digest:
            raise SourceError(f"{path}: sha256 differs from {manifest} (corrupt or modified)")


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (a killed job never leaves half a file that looks finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def failure_record_path(output: str | Path) -> Path:
    """Where a failing job records what failed and why, beside its output: ``<output>.failed.json``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".json") + ".failed.json")
