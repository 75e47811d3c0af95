"""Shards are checked against manifest.json: a damaged shard is named and every episode it loses is counted."""

import json
import logging
import random
import tarfile

import pytest

from conftest import make_loader, metrics, run_recipe
from handmade import write_dataset
from tml.checksum import sha256
from tml.data.loader import DataError, ShardEpisodeSource, BadSample

PER_SHARD = 24


def dataset(tmp_path):
    data = write_dataset(tmp_path / "d", 2 * PER_SHARD, PER_SHARD)
    manifest = json.loads((data / "manifest.json").read_text())
    for s in manifest["shards"]:  # what data_prep writes: hashes beside the counts
        s["sha256"] = sha256(data / s["name"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def overwrite(path, where: str, n: int):
    """Overwrite n bytes of a file with seeded random bytes at its start, middle or end."""
    raw = bytearray(path.read_bytes())
    at = {"header": 0, "middle": len(raw) // 2 - n // 2, "tail": len(raw) - n}[where]
    raw[at:at + n] = random.Random(at).randbytes(n)
    path.write_bytes(bytes(raw))


def one_epoch(source):
    """Good episode count and bad items per shard over epoch 0, straight from the reader."""
    good, bad = {}, {}
    for (epoch, si, _), item in source.iterate():
        if epoch > 0:
            return good, bad
        name = source.rank_shards(0)[si]
        if isinstance(item, BadSample):
            bad.setdefault(name, []).append(item)
        else:
            good[name] = good.get(name, 0) + 1


@pytest.mark.parametrize("where,n", [("header", 512), ("middle", 200_000), ("middle", 3000), ("tail", 60_000)])
def test_every_lost_episode_of_a_damaged_shard_is_counted(tmp_path, where, n):
    data = dataset(tmp_path)
    overwrite(data / "shard-000001.tar", where, n)
    good, bad = one_epoch(ShardEpisodeSource(data, 0, 1, seed=7, verify="count"))
    assert good["shard-000000.tar"] == PER_SHARD and "shard-000000.tar" not in bad
    # Whatever the damage, the shard's good episodes plus the counted bad ones make up its manifest's 24.
    assert good.get("shard-000001.tar", 0) + sum(b.count for b in bad["shard-000001.tar"]) == PER_SHARD
    assert good.get("shard-000001.tar", 0) < PER_SHARD
    assert all("shard-000001.tar" in b.where for b in bad["shard-000001.tar"])
    assert ShardEpisodeSource(data, 0, 1, seed=7, verify="sha256").damaged.keys() == {"shard-000001.tar"}


def test_the_loader_counts_lost_episodes_in_bad_samples_and_names_the_shard(tmp_path, caplog):
    data = dataset(tmp_path)
    overwrite(data / "shard-000001.tar", "middle", 200_000)  # the case that used to lose 12 episodes silently
    loader = make_loader(data, seq_len=60, mbs=1, max_bad_fraction=1.0, verify="count")
    good, bad = one_epoch(loader.source)
    with caplog.at_level(logging.WARNING):
        while loader.state_dict()["workers"][0][0] == 0:  # one epoch
            next(loader)
    lost = PER_SHARD - good["shard-000001.tar"]
    assert lost > 0 and loader.stats()["data/bad_samples"] == lost
    assert sum(loader.bad_by_reason.values()) == lost
    assert any("shard-000001.tar" in r.getMessage() and f"{lost}" in r.getMessage() for r in caplog.records)


def test_sha256_skips_a_changed_shard_whole_and_count_mode_does_not_hash(tmp_path, caplog):
    data = dataset(tmp_path)
    with tarfile.open(data / "shard-000001.tar") as tar:  # inside a wav's samples: decodes, only a hash can tell
        at = next(m for m in tar.getmembers() if m.name.endswith(".wav")).offset_data + 1000
    raw = bytearray((data / "shard-000001.tar").read_bytes())
    raw[at:at + 1000] = bytes(1000)
    (data / "shard-000001.tar").write_bytes(bytes(raw))
    good, _ = one_epoch(ShardEpisodeSource(data, 0, 1, seed=7, verify="count"))
    assert good["shard-000001.tar"] == PER_SHARD  # reads everything: the damage is unseen without a hash
    with caplog.at_level(logging.WARNING):
        source = ShardEpisodeSource(data, 0, 1, seed=7, verify="sha256")
    assert any("shard-000001.tar" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    good, bad = one_epoch(source)
    assert "shard-000001.tar" not in good
    assert [(b.reason, b.count) for b in bad["shard-000001.tar"]] == [("sha256_mismatch", PER_SHARD)]
    assert ShardEpisodeSource(data, 0, 1, seed=7, verify="auto").damaged.keys() == {"shard-000001.tar"}
    assert ShardEpisodeSource(data, 0, 1, seed=7, verify="auto", verify_auto_max_gb=1e-6).damaged == {}


def test_max_bad_fraction_applies_to_lost_episodes(tmp_path):
    data = dataset(tmp_path)
    overwrite(data / "shard-000000.tar", "header", 512)
    overwrite(data / "shard-000001.tar", "header", 512)
    loader = make_loader(data, seq_len=60, mbs=1, verify="count")  # max_bad_fraction 0.05
    with pytest.raises(DataError, match=r"max_bad_fraction|no readable sample"):
        for _ in range(100):
            next(loader)


def test_verify_sha256_needs_hashes_and_a_known_mode(tmp_path):
    data = write_dataset(tmp_path / "d", 4, 4)  # hand-made manifest without sha256
    with pytest.raises(DataError, match="no sha256.*verify=count"):
        ShardEpisodeSource(data, 0, 1, seed=7, verify="sha256")
    with pytest.raises(DataError, match="verify='md5'"):
        ShardEpisodeSource(data, 0, 1, seed=7, verify="md5")


def test_the_run_manifest_counts_lost_episodes(tmp_path):
    data = write_dataset(tmp_path / "d", 24, 6)
    overwrite(data / "shard-000002.tar", "header", 512)  # all 6 of its episodes are lost
    run = tmp_path / "run"
    run_recipe(run, f"data.path={data}", "trainer.max_steps=8", "logger=none", "data.loader.max_bad_fraction=0.5")
    quality = json.loads((run / "manifest.json").read_text())["data_quality"]
    assert quality["bad_by_reason"] == {"corrupt_tar": quality["data/bad_samples"]}
    assert quality["data/bad_samples"] in (6, 12)  # once per epoch that reached the shard
    assert metrics(run)[-1]["data/bad_samples"] == quality["data/bad_samples"]
