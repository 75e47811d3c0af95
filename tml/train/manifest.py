"""Provenance: ``RUN_DIR/manifest.json`` says which code, config, environment and data made a run."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tml.checksum import sha256
from tml.environment import facts as environment_facts

PACKAGES = ("torch", "torchaudio", "deepspeed", "hydra-core", "webdataset", "tokenizers", "wandb", "numpy",
            "safetensors", "tml")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(src: Path | None = None) -> dict:
    """Git commit of the tml checkout and whether its tracked files differ from it (``dirty``)."""
    src = src or Path(__file__).resolve().parents[2]
    commit = _git("rev-parse", "HEAD", cwd=src)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=src)
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None, "source_dir": str(src)}


def data_provenance(data_dir: str | Path, manifest: dict) -> dict:
    """Hash of the data set's manifest.json, its shard hashes as recorded there, and its sources and licences."""
    path = Path(data_dir) / "manifest.json"
    return {"path": str(Path(data_dir).resolve()), "manifest_sha256": sha256(path),
            "shards": {s["name"]: s.get("sha256") for s in manifest.get("shards", [])},
            "episodes": manifest.get("episodes"), "hours": manifest.get("hours"),
            "sources": manifest.get("sources", [manifest["generator"]] if "generator" in manifest else []),
            "license": manifest.get("license", manifest.get("licenses"))}


def build_manifest(config: dict, data_dir: str | Path, data_manifest: dict, world_size: int) -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **code_version(),
            "command": [sys.executable, *sys.argv], "host": socket.gethostname(),
            "platform": platform.platform(), "python": platform.python_version(), "world_size": world_size,
            "packages": versions, "environment": environment_facts(check_imports=False), "config": config, "data": data_provenance(data_dir, data_manifest)}


def record_data_quality(run_dir: Path, per_rank: list[dict]) -> dict:
    """Put the loaders' counters (``data/*`` stats plus ``bad_by_reason``, one dict per rank) summed over ranks into
    ``manifest.json`` as ``data_quality``; returns the sums."""
    total: dict = {"bad_by_reason": {}}
    for r in per_rank:
        for k, v in r.items():
            if k == "bad_by_reason":
                for reason, n in v.items():
                    total["bad_by_reason"][reason] = total["bad_by_reason"].get(reason, 0) + n
            else:
                total[k] = total.get(k, 0) + v
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["data_quality"] = total
    path.write_text(json.dumps(manifest, indent=2))
    return total


def write_manifest(run_dir: Path, manifest: dict) -> Path:
    """Write ``manifest.json``; a resumed run keeps the first one and appends itself to ``resumes``."""
    path = run_dir / "manifest.json"
    if path.exists():
        first = json.loads(path.read_text())
        first.setdefault("resumes", []).append({k: manifest[k] for k in ("created", "git_commit", "git_dirty",
                                                                          "command", "host", "world_size")})
        manifest = first
    path.write_text(json.dumps(manifest, indent=2))
    return path
