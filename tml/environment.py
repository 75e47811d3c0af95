"""The Python environment against the repository's lock (``requirements/lock.txt``).

The lock is the environment: every package at an exact version and hash, compiled by uv from pyproject.toml
(``make lock``). This module reads it, compares it with what is installed, and collects the facts a run or a bug
report needs (torch / torchaudio / deepspeed / CUDA / NCCL / espeak-ng). ``python -m tml.tools.doctor`` prints
them; the trainer writes them into ``manifest.json``. Nothing here imports torch at module level, so a broken
torch/torchaudio pair is reported by name instead of dying on import.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LOCK_PATH = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
# Optional GPU-node additions (make setup-gpu): checked when installed, never required.
GPU_LOCK_PATH = LOCK_PATH.with_name("gpu.txt")
# Installed but never in a lock: the installer itself and the project (an editable install of this checkout).
NOT_LOCKED = {"pip", "tml"}
FIX = ("run `make setup` (rebuilds .venv from requirements/lock.txt), or in your own environment "
       "`pip install --require-hashes --no-deps -r requirements/lock.txt`")


def normalize(name: str) -> str:
    """PEP 503 name: ``Foo_Bar`` and ``foo-bar`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class LockedPackage:
    name: str  # normalized
    version: str
    marker: str | None  # environment marker, e.g. "sys_platform == 'linux'"; None applies everywhere


def read_lock(path: Path = LOCK_PATH) -> list[LockedPackage]:
    """Parse a pip requirements lock (``name==version ; marker \\`` lines with ``--hash`` continuations)."""
    pkgs = []
    for line in path.read_text().splitlines():
        if not line or line[0] in " #-\t":
            continue
        spec = line.rstrip("\\").strip()
        req, _, marker = spec.partition(";")
        name, sep, version = req.strip().partition("==")
        if not sep:
            raise ValueError(f"{path}: '{line}' is not pinned with ==; regenerate the lock with `make lock`")
        pkgs.append(LockedPackage(normalize(name), version.strip(), marker.strip() or None))
    return pkgs


def locked_here(path: Path = LOCK_PATH) -> dict[str, str]:
    """{name: version} of the lock's entries whose markers apply to this interpreter and platform."""
    from packaging.markers import Marker

    return {p.name: p.version for p in read_lock(path) if p.marker is None or Marker(p.marker).evaluate()}


def installed() -> dict[str, str]:
    """{name: version} of what pip installed into this interpreter's site-packages. Only there: once setuptools is
    imported (DeepSpeed's op builder does) it appends its ``_vendor`` folder to sys.path, whose dist-infos are no
    installs of ours."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths) if d.metadata["Name"]}


def lock_sha256(path: Path = LOCK_PATH) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def lock_differences(path: Path = LOCK_PATH, have: dict[str, str] | None = None) -> list[str]:
    """One line per package that differs from the lock: wrong version, missing, or installed but not locked."""
    want = locked_here(path)
    have = installed() if have is None else have
    if GPU_LOCK_PATH.exists():  # GPU extras count as locked only where installed
        want.update({n: v for n, v in locked_here(GPU_LOCK_PATH).items() if n in have})
    out = []
    for name, version in sorted(want.items()):
        if name not in have:
            out.append(f"{name}: locked {version}, not installed")
        elif have[name] != version and have[name].split("+")[0] != version:  # torch reports 2.11.0+cu130
            out.append(f"{name}: locked {version}, installed {have[name]}")
    out += [f"{name}: installed {v}, not in the lock" for name, v in sorted(have.items())
            if name not in want and name not in NOT_LOCKED]
    return out


def _torchaudio_loads() -> str | None:
    """None when torchaudio imports beside this torch; else the reason (checked in a child: a bad pair can crash)."""
    code = "import torchaudio, torchaudio.functional as F, torch; F.resample(torch.zeros(160), 16000, 8000)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return last


def espeak_version() -> str | None:
    try:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
    except (ImportError, OSError):
        return None
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    return lib.espeak_Info(None).decode()


def facts(check_imports: bool = True, lock: Path = LOCK_PATH) -> dict:
    """What a run manifest and a bug report need: versions, accelerator stack, and the lock's hash and status."""
    have = installed()
    out = {"python": sys.version.split()[0], "lock_path": str(lock) if lock.exists() else None,
           "lock_sha256": lock_sha256(lock), "torch": have.get("torch"), "torchaudio": have.get("torchaudio"),
           "deepspeed": have.get("deepspeed"), "espeak_ng": espeak_version()}
    out["lock_differences"] = lock_differences(lock, have) if lock.exists() else None
    out["matches_lock"] = out["lock_differences"] == [] if lock.exists() else None
    if check_imports:
        out["torchaudio_error"] = _torchaudio_loads()
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
    except (ImportError, OSError, RuntimeError) as e:
        out["torch_error"] = str(e)
    return out
