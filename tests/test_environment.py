"""The environment is the lock: the test venv equals requirements/lock.txt, and the doctor names what differs."""

import subprocess
import sys
from pathlib import Path

from tml.environment import LOCK_PATH, installed, lock_differences, locked_here, read_lock

ROOT = Path(__file__).resolve().parents[1]


def test_lock_pins_every_package_with_hashes():
    text = LOCK_PATH.read_text()
    pkgs = read_lock()
    assert len(pkgs) > 50
    assert text.count("==") >= len(pkgs) and text.count("--hash=sha256:") >= len(pkgs)
    by_name = {p.name: p.version for p in pkgs if p.marker is None}
    assert by_name["torch"] == "2.11.0" and by_name["torchaudio"] == "2.11.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.11.0"' in pyproject and '"torchaudio==2.11.0"' in pyproject


def test_this_environment_is_the_lock():
    """What `make setup` installed (this test's own venv) is exactly the lock: same names, same versions."""
    assert lock_differences() == []
    want, have = locked_here(), installed()
    assert {n for n in have if n not in ("pip", "tml")} == set(want)


def test_setuptools_vendored_packages_are_not_installs():
    """DeepSpeed imports setuptools, which puts setuptools/_vendor on sys.path: its dist-infos must not count."""
    import setuptools  # noqa: F401

    assert lock_differences() == []


def test_differences_name_the_package(tmp_path):
    want = locked_here()
    have = dict(want, torchaudio="2.11.1", **{"extra-pkg": "1.0"})
    del have["einops"]
    diff = lock_differences(have=have)
    assert diff == ["einops: locked " + want["einops"] + ", not installed",
                    "torchaudio: locked 2.11.0, installed 2.11.1",
                    "extra-pkg: installed 1.0, not in the lock"]


def test_read_lock_refuses_an_unpinned_line(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("torch>=2.11 \\\n    --hash=sha256:00\n")
    try:
        read_lock(bad)
    except ValueError as e:
        assert "torch>=2.11" in str(e) and "make lock" in str(e)
    else:
        raise AssertionError("an unpinned lock line was accepted")


def test_doctor_passes_here_and_fails_on_another_torchaudio(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "tml.tools.doctor"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "torchaudio      2.11.0" in ok.stdout and "environment matches the lock" in ok.stdout
    # The lock of the day torchaudio 2.11.1 came out: this venv (2.11.0) no longer matches it, by name.
    moved = tmp_path / "lock.txt"
    moved.write_text(LOCK_PATH.read_text().replace("torchaudio==2.11.0", "torchaudio==2.11.1"))
    bad = subprocess.run([sys.executable, "-m", "tml.tools.doctor", "--lock", str(moved)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "torchaudio: locked 2.11.1, installed 2.11.0" in bad.stderr and "make setup" in bad.stderr


def test_gpu_extras_are_checked_only_where_installed():
    """requirements/gpu.txt (grouped-gemm) is optional: absent is fine, installed must be the pinned version."""
    have = {k: v for k, v in installed().items() if k != "grouped-gemm"}
    assert not any(d.startswith("grouped-gemm") for d in lock_differences(have=have))
    gpu = {p.name: p.version for p in read_lock(LOCK_PATH.with_name("gpu.txt"))}
    assert gpu == {"grouped-gemm": "0.3.0"}
    assert lock_differences(have={**have, "grouped-gemm": "0.3.0"}) == []
    assert lock_differences(have={**have, "grouped-gemm": "0.2.0"}) == ["grouped-gemm: locked 0.3.0, installed 0.2.0"]
