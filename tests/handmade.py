"""Small hand-made data sets on disk (real webdataset shards, manifest and BPE) for tests that need no speech."""

import json

import torch
import webdataset as wds

from tml.streams import Episode, Word
from tml.text.tokenizer import train_bpe

SR = 16000
WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


def episode(i: int) -> Episode:
    g = torch.Generator().manual_seed(i)
    dur = 0.6 + 0.2 * (i % 4)  # 3..6 micro-turns
    n = int(dur * SR)
    return Episode(key=f"ep{i:03d}", duration=dur, sample_rate=SR,
                   audio={"user": 0.1 * torch.randn(n, generator=g), "model": 0.1 * torch.randn(n, generator=g)},
                   words={"user": [], "model": [Word(WORDS[i % len(WORDS)], 0.1, 0.3)]})


def write_dataset(path, n_episodes, per_shard, corrupt=(), repeat_first=False, edit_episode=None, edit_sample=None):
    """Shards of ``episode(i)``; ``corrupt`` indices get an unreadable user.wav; ``repeat_first`` makes every episode
    a copy of episode 0 (so every rank and step sees identical data); ``edit_episode`` / ``edit_sample`` map an index
    to a function that changes its Episode / webdataset sample dict in place before it is written."""
    edit_episode, edit_sample = edit_episode or {}, edit_sample or {}
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n_episodes, per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path / name)) as w:
            for i in range(s, min(s + per_shard, n_episodes)):
                ep = episode(0 if repeat_first else i)
                ep.key = f"ep{i:03d}"
                if i in edit_episode:
                    edit_episode[i](ep)
                sample = ep.to_sample()
                if i in edit_sample:
                    edit_sample[i](sample)
                if i in corrupt:
                    sample["user.wav"] = b"RIFF not really a wav"
                w.write(sample)
        shards.append({"name": name, "episodes": min(per_shard, n_episodes - s)})
    train_bpe([" ".join(WORDS)] * 10, 300, path / "tokenizer.json")
    (path / "manifest.json").write_text(json.dumps({"shards": shards, "tokenizer": "tokenizer.json"}))
    return path
