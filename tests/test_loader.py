"""Shards on disk -> packed batches: rank split, exact resume, bad samples named and counted."""

import json
import logging

import pytest
import torch

from tml.audio.dmel import DMelTokenizer
from tml.data.loader import DataError, LoaderConfig, PackedBatchLoader, read_manifest
from tml.streams import LayoutConfig, MicroTurnLayout

from handmade import write_dataset


def make_loader(path, rank=0, world=1, seq_len=100, mbs=2):
    from tml.text.tokenizer import TextTokenizer

    return PackedBatchLoader(path, LoaderConfig(seq_len=seq_len, micro_batch_size=mbs, seed=7),
                             MicroTurnLayout(LayoutConfig()), DMelTokenizer(),
                             TextTokenizer.load(path / "tokenizer.json"), rank=rank, world_size=world)


def same(a, b):
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[f], tb[f]) for f in ta)


def test_resume_reads_exactly_the_same_batches(tmp_path):
    data = write_dataset(tmp_path / "d", 10, 3)
    ref = make_loader(data)
    batches = [next(ref) for _ in range(12)]  # > one epoch: crosses the epoch boundary
    loader = make_loader(data)
    for _ in range(5):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip
    resumed = make_loader(data)
    resumed.load_state_dict(state)
    for want in batches[5:]:
        assert same(next(resumed), want)
    assert resumed.stats() == ref.stats()


def test_ranks_read_disjoint_shards_covering_the_epoch(tmp_path):
    data = write_dataset(tmp_path / "d", 12, 3)  # 4 shards of 3
    keys = []
    for rank in range(2):
        loader = make_loader(data, rank, 2)
        eps = []
        it = loader.source.iterate()
        while True:
            (epoch, _, _), ep = next(it)
            if epoch > 0:
                break
            eps.append(ep.key)
        keys.append(eps)
    assert len(keys[0]) == len(keys[1]) == 6
    assert set(keys[0]).isdisjoint(keys[1]) and len(set(keys[0]) | set(keys[1])) == 12


def test_bad_samples_are_named_counted_and_skipped(tmp_path, caplog):
    data = write_dataset(tmp_path / "d", 6, 6, corrupt={2})
    loader = make_loader(data, seq_len=60, mbs=1)
    with caplog.at_level(logging.WARNING):
        for _ in range(8):
            next(loader)
    assert loader.stats()["data/bad_samples"] >= 1
    assert any("ep002" in r.getMessage() and "shard-000000.tar" in r.getMessage() for r in caplog.records)


def test_too_many_bad_samples_stop_with_an_error(tmp_path):
    data = write_dataset(tmp_path / "d", 24, 24, corrupt=set(range(0, 24, 2)))
    loader = make_loader(data, seq_len=60, mbs=1)
    with pytest.raises(DataError, match="max_bad_fraction"):
        for _ in range(100):
            next(loader)


def test_missing_data_names_the_fix(tmp_path):
    data = write_dataset(tmp_path / "d", 3, 3)
    with pytest.raises(DataError, match="synth_dialogues"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="ranks"):
        make_loader(data, rank=0, world=2)
