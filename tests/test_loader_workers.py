"""The loader with worker processes and several ranks: exact resume, and every sample once per epoch."""

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, make_loader
from handmade import write_dataset


def same(a, b):
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[f], tb[f]) for f in ta)


def test_resume_with_workers_reads_exactly_the_same_batches(tmp_path):
    # 4 shards of 4 (one with a bad sample, so the counters are part of what must match), 2 worker processes.
    data = write_dataset(tmp_path / "d", 16, 4, corrupt={5})
    ref = make_loader(data, workers=2, max_bad_fraction=0.2)
    batches = [next(ref) for _ in range(14)]  # > one epoch (16 episodes x 3-6 turns, 5 turns per row, 2 rows)
    assert ref.state_dict()["workers"][0][0] >= 1 and ref.stats()["data/bad_samples"] >= 1
    for k in (3, 8):
        loader = make_loader(data, workers=2, max_bad_fraction=0.2)
        for _ in range(k):
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))
        loader.close()
        resumed = make_loader(data, workers=2, max_bad_fraction=0.2)
        resumed.load_state_dict(state)
        for want in batches[k:]:
            assert same(next(resumed), want)
        assert resumed.stats() == ref.stats()


def test_workers_take_turns_over_disjoint_shards(tmp_path):
    """With W workers the rank's stream is the round robin of W readers; the in-process reader w (same split) is
    the independent reference."""
    data = write_dataset(tmp_path / "d", 12, 3)
    loader = make_loader(data, workers=2, max_bad_fraction=0.2)
    got = [(pos, tok.key) for _, (pos, tok) in zip(range(10), loader.episodes())]
    readers = [loader.source.iterate((0, 0, 0), w) for w in range(2)]
    want = [next(readers[i % 2])[1].key for i in range(10)]
    assert [k for _, k in got] == want
    assert [p[0] for p, _ in got] == [i % 2 for i in range(10)]


def test_state_from_another_worker_count_is_refused(tmp_path):
    data = write_dataset(tmp_path / "d", 8, 2)
    a = make_loader(data, workers=2)
    next(a)
    b = make_loader(data, workers=0)
    try:
        b.load_state_dict(a.state_dict())
    except Exception as e:  # noqa: BLE001 - checked below
        assert "num_workers" in str(e)
    else:
        raise AssertionError("a state saved with 2 workers was accepted by a loader with 0")


RANK_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_loader
data, rank = Path(sys.argv[1]), int(sys.argv[2])
loader = make_loader(data, rank=rank, world=2, workers=2)
keys, done = [], set()
for (w, epoch, shard, sample), tok in loader.episodes():
    if epoch == 0:
        keys.append(tok.key)
    else:
        done.add(w)
    if done == {0, 1}:
        break
print(json.dumps(keys))
"""


def test_two_ranks_see_every_sample_once_per_epoch(tmp_path):
    data = write_dataset(tmp_path / "d", 20, 2)  # 10 shards over 2 ranks x 2 workers: uneven on purpose
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(data), str(r)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    keys = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        keys.append(json.loads(out.strip().splitlines()[-1]))
    every = keys[0] + keys[1]
    assert sorted(every) == [f"ep{i:03d}" for i in range(20)]  # each key exactly once across ranks and workers
    assert set(keys[0]).isdisjoint(keys[1]) and keys[0] and keys[1]
