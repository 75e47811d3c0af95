"""Every kind of bad input is skipped, counted by reason and named (shard + key + reason); nothing is written."""

import io
import logging
import math

import numpy as np
import pytest
import torch
import torchaudio

from conftest import make_loader
from handmade import write_dataset
from tml.audio.wav import encode_wav
from tml.data.loader import DataError
from tml.streams import Word

SHARD0 = "shard-000000.tar"


def npy(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    return buf.getvalue()


def nan_audio(sample):  # NaN can only live in a float stream: lossless float32 .npy audio
    x = torch.zeros(9600)
    x[100] = math.nan
    del sample["user.wav"]
    sample["user.npy"] = npy(x)


def inf_audio(sample):
    x = torch.zeros(9600)
    x[5] = math.inf
    del sample["model.wav"]
    sample["model.npy"] = npy(x)


def at_8k(ep):  # the same episode recorded at 8 kHz
    ep.sample_rate = 8000
    ep.audio = {k: torchaudio.functional.resample(v, 16000, 8000) for k, v in ep.audio.items()}


CASES = {
    "unreadable_audio": dict(edit_sample={1: lambda s: s.update({"model.wav": b"RIFF\x00\x00junk"})}),
    "truncated_wav": dict(edit_sample={1: lambda s: s.update({"user.wav": s["user.wav"][:-1001]})}),
    "bad_json": dict(edit_sample={1: lambda s: s.update({"json": b"{not json"})}),
    "wav_rate_differs_from_json": dict(edit_sample={1: lambda s: s.update(
        {"user.wav": encode_wav(torch.zeros(4800), 8000)})}),
    "nonfinite_audio_nan": dict(edit_sample={1: nan_audio}),
    "nonfinite_audio_inf": dict(edit_sample={1: inf_audio}),
    "empty_text": dict(edit_episode={1: lambda e: e.words["model"].append(Word("  ", 0.3, 0.4))}),
    "mistimed_text_backwards": dict(edit_episode={1: lambda e: e.words["model"].append(Word("beta", 0.4, 0.2))}),
    "mistimed_text_late": dict(edit_episode={1: lambda e: e.words["model"].append(Word("beta", 30.0, 30.5))}),
    "length_mismatch": dict(edit_episode={1: lambda e: e.audio.update(model=e.audio["model"][:1000])}),
    "wrong_sample_rate_rejected": dict(edit_episode={1: at_8k}),
}
REASON = {"truncated_wav": "unreadable_audio", "wav_rate_differs_from_json": "wrong_sample_rate",
          "nonfinite_audio_nan": "nonfinite_audio", "nonfinite_audio_inf": "nonfinite_audio",
          "mistimed_text_backwards": "mistimed_text", "mistimed_text_late": "mistimed_text",
          "wrong_sample_rate_rejected": "wrong_sample_rate"}


def read_all(data, n_batches=6, **kw):
    loader = make_loader(data, seq_len=60, mbs=1, max_bad_fraction=0.5, **kw)
    for _ in range(n_batches):
        next(loader)
    return loader


def snapshot(path):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.iterdir())}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_is_named_counted_and_skipped(case, tmp_path, caplog):
    data = write_dataset(tmp_path / "d", 4, 4, **CASES[case])
    before = snapshot(data)
    with caplog.at_level(logging.WARNING):
        loader = read_all(data, resample=False)
    reason = REASON.get(case, case)
    assert loader.bad_by_reason == {reason: loader.stats()["data/bad_samples"]}
    assert loader.stats()["data/bad_samples"] >= 1
    bad = loader.bad_samples[0]
    assert bad.where.endswith(f"{SHARD0}:ep001") and bad.reason == reason
    assert any(f"{SHARD0}:ep001" in r.getMessage() and f"[{reason}]" in r.getMessage() for r in caplog.records)
    assert snapshot(data) == before  # the loader never writes


def test_wrong_sample_rate_is_resampled_when_configured(tmp_path):
    ref = read_all(write_dataset(tmp_path / "ref", 4, 4), resample=True)
    loader = read_all(write_dataset(tmp_path / "d", 4, 4, edit_episode={1: at_8k}), resample=True)
    assert loader.stats() == ref.stats() and loader.bad_by_reason == {}


def test_corrupt_and_truncated_tar_are_named(tmp_path, caplog):
    data = write_dataset(tmp_path / "d", 9, 3)
    (data / "shard-000001.tar").write_bytes(b"this is no tar file at all" * 40)
    full = (data / "shard-000002.tar").read_bytes()
    (data / "shard-000002.tar").write_bytes(full[: len(full) * 2 // 3])  # cut inside the second sample
    before = snapshot(data)
    with caplog.at_level(logging.WARNING):
        loader = read_all(data, n_batches=12)
    assert loader.bad_by_reason["corrupt_tar"] >= 2
    where = [b.where for b in loader.bad_samples]
    assert any("shard-000001.tar (from the start)" in w for w in where)
    assert any("shard-000002.tar (after key ep006)" in w for w in where)
    assert snapshot(data) == before


def test_too_many_bad_samples_stop_naming_the_key_and_reasons(tmp_path):
    bad = {i: (lambda s: s.update({"json": b"{"})) for i in range(0, 30, 3)}
    data = write_dataset(tmp_path / "d", 30, 30, edit_sample=bad)
    loader = make_loader(data, seq_len=60, mbs=1)
    with pytest.raises(DataError, match=r"max_bad_fraction=0.05.*bad_json.*shard-000000.tar:ep0"):
        for _ in range(200):
            next(loader)
