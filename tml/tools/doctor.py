"""Is this the locked environment? ``python -m tml.tools.doctor``

Prints torch / torchaudio / deepspeed / CUDA / NCCL / espeak-ng versions and every difference from
``requirements/lock.txt``; exits 1 with the fix when there is one. A torchaudio that does not load beside the
installed torch (the 2.11.1-with-2.11.0 symbol error) is named as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tml.environment import FIX, LOCK_PATH, facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tml.tools.doctor", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    ap.add_argument("--lock", type=Path, default=LOCK_PATH, help="the lock to compare with (default: %(default)s)")
    args = ap.parse_args(argv)
    f = facts(lock=args.lock)
    if args.json:
        print(json.dumps(f, indent=2))
    else:
        for key in ("python", "torch", "torchaudio", "deepspeed", "cuda", "cuda_available", "nccl", "espeak_ng",
                    "lock_path", "lock_sha256"):
            print(f"{key:15s} {f.get(key)}")
    problems = []
    if f["lock_path"] is None:
        problems.append(f"no lock at {args.lock} (tml installed from a wheel?): nothing to compare against")
    problems += list(f["lock_differences"] or [])
    if f.get("torchaudio_error"):
        problems.append(f"torchaudio {f['torchaudio']} does not load beside torch {f['torch']} (a mismatched "
                        f"torch/torchaudio pair; the lock pins both exactly): {f['torchaudio_error']}")
    if f["espeak_ng"] is None:
        problems.append("espeak-ng not loadable from the espeakng-loader package (needed for synthetic data)")
    if problems:
        print("\nthis environment differs from the lock:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(f"fix: {FIX}", file=sys.stderr)
        return 1
    print("environment matches the lock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
