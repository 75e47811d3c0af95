"""webdataset shards -> a resumable, rank-aware stream of packed ``Batch`` es.

Order: every epoch the shard list is shuffled with ``seed + epoch`` and rank ``r`` of ``w`` reads shards
``r, r + w, ...`` of it, samples in file order. Each rank packs its own episodes into rows (``tml.streams.pack``).
The loader's state is the cursor of the next row: (epoch, shard index, sample index, micro-turn offset), so a
resumed run reads exactly the batches an uninterrupted one would have read, without decoding what it skips.

Bad samples (unreadable audio, wrong sample rate, malformed metadata) are skipped with a warning naming the
shard and key, and counted; more than ``max_bad_fraction`` of bad samples stops the run with an error.
A shard that cannot be read as tar is skipped the same way.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds

from tml.audio.dmel import DMelTokenizer
from tml.streams.batch import Batch
from tml.streams.episode import Episode, EpisodeError
from tml.streams.interleave import EpisodeTokens, interleave
from tml.streams.layout import MicroTurnLayout
from tml.streams.pack import PackCursor, collate, pack_rows
from tml.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data set cannot be used as configured; the message names the path or sample and the fix."""


@dataclass
class LoaderConfig:
    seq_len: int = 1000  # positions per row; a multiple of the micro-turn length wastes nothing
    micro_batch_size: int = 2  # rows per batch per rank
    seed: int = 1234
    max_bad_fraction: float = 0.05


def read_manifest(data_dir: str | Path) -> dict:
    """The data set's manifest.json (written last by data_prep, so its presence means the shards are complete)."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise DataError(f"{path} not found: make the data first, e.g. `python -m data_prep.synth_dialogues "
                        f"--out {data_dir} --episodes 96 --seed 0` (or `make data`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); regenerate the data set") from e
    missing = [s["name"] for s in manifest.get("shards", []) if not (Path(data_dir) / s["name"]).exists()]
    if missing:
        raise DataError(f"{path} lists shards that are missing: {missing[:5]}")
    if not manifest.get("shards"):
        raise DataError(f"{path} lists no shards")
    return manifest


class ShardEpisodeSource:
    """Episodes of one rank, in a deterministic order that can be re-entered at any (epoch, shard, sample)."""

    def __init__(self, data_dir: str | Path, rank: int, world_size: int, seed: int):
        self.data_dir = Path(data_dir)
        self.shards = [s["name"] for s in read_manifest(data_dir)["shards"]]
        if len(self.shards) < world_size:
            raise DataError(f"{self.data_dir} has {len(self.shards)} shards but there are {world_size} data-parallel "
                            f"ranks; every rank needs at least one shard: regenerate with a smaller --shard-size")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.seen = 0
        self.bad = 0

    def rank_shards(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(self.seed + epoch).shuffle(order)
        return order[self.rank :: self.world_size]

    def _count_bad(self, what: str) -> None:
        self.bad += 1
        log.warning("skipping %s (bad samples so far: %d of %d)", what, self.bad, self.seen)

    def iterate(self, start: tuple[int, int, int] = (0, 0, 0)) -> Iterator[tuple[tuple[int, int, int], Episode]]:
        """Yield ((epoch, shard index, sample index), Episode) forever, starting at ``start``."""
        epoch, shard_i, sample_i = start
        while True:
            shards = self.rank_shards(epoch)
            for si in range(shard_i, len(shards)):
                url = str(self.data_dir / shards[si])
                samples = wds.tarfile_samples([{"url": url}])
                try:
                    for k, sample in enumerate(samples):
                        if k < sample_i:
                            continue  # resume: skip without decoding
                        self.seen += 1
                        try:
                            episode = Episode.from_sample(sample)
                        except EpisodeError as e:
                            self._count_bad(f"{url}:{sample.get('__key__')}: {e}")
                            continue
                        yield (epoch, si, k), episode
                except (tarfile.TarError, OSError, ValueError) as e:
                    self.seen += 1
                    self._count_bad(f"rest of shard {url}: not readable as tar ({e})")
                sample_i = 0
            epoch, shard_i = epoch + 1, 0


class PackedBatchLoader:
    """Iterator of packed ``Batch`` es of shape [micro_batch_size, seq_len] for one rank, with exact resume.

    ``state_dict()`` after a batch names where the next batch starts; ``load_state_dict`` re-enters there.
    """

    def __init__(self, data_dir: str | Path, cfg: LoaderConfig, layout: MicroTurnLayout, dmel: DMelTokenizer,
                 text: TextTokenizer, rank: int = 0, world_size: int = 1):
        if cfg.seq_len < layout.length:
            raise DataError(f"data.loader.seq_len={cfg.seq_len} is shorter than one micro-turn "
                            f"({layout.length} positions: {layout.describe()}); raise it")
        self.cfg, self.layout, self.dmel, self.text = cfg, layout, dmel, text
        self.source = ShardEpisodeSource(data_dir, rank, world_size, cfg.seed)
        self.cursor = PackCursor((0, 0, 0), 0)
        self.batches = 0
        self.dropped_text = 0
        # Counters as they stood just before the cursor's episode was read: a resumed loader reads it again.
        self._cursor_counts = (0, 0, 0)
        self._last_counts = (0, 0, 0)
        self._it: Iterator[Batch] | None = None

    def state_dict(self) -> dict:
        seen, bad, dropped = self._cursor_counts
        return {"position": list(self.cursor.position), "turn_offset": self.cursor.turn_offset,
                "batches": self.batches, "seen": seen, "bad": bad, "dropped_text": dropped}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = PackCursor(tuple(state["position"]), int(state["turn_offset"]))
        self.batches = int(state["batches"])
        self.source.seen, self.source.bad = int(state["seen"]), int(state["bad"])
        self.dropped_text = int(state["dropped_text"])
        self._cursor_counts = (self.source.seen, self.source.bad, self.dropped_text)
        self._it = None

    def stats(self) -> dict:
        return {"data/episodes_seen": self.source.seen, "data/bad_samples": self.source.bad,
                "data/dropped_text_tokens": self.dropped_text}

    def _tokens(self, start: tuple) -> Iterator[tuple[tuple, EpisodeTokens]]:
        for pos, episode in self.source.iterate(start):
            tok = interleave(episode, self.layout, self.dmel, self.text)
            # The packer's cursor always names the episode it pulled last, so these are the cursor's counts.
            self._last_counts = (self.source.seen - 1, self.source.bad, self.dropped_text)
            self.dropped_text += tok.dropped_text
            if self.source.seen >= 20 and self.source.bad > self.cfg.max_bad_fraction * self.source.seen:
                raise DataError(f"{self.source.bad} of {self.source.seen} samples in {self.source.data_dir} are bad "
                                f"(> data.loader.max_bad_fraction={self.cfg.max_bad_fraction}); see the warnings")
            yield pos, tok

    def _batches(self) -> Iterator[Batch]:
        rows = pack_rows(self._tokens(self.cursor.position), self.cfg.seq_len, self.layout.length,
                         start_offset=self.cursor.turn_offset)
        while True:
            group = []
            for _ in range(self.cfg.micro_batch_size):
                pieces, nxt = next(rows)
                group.append(pieces)
            batch = collate(group, self.cfg.seq_len)
            self.cursor, self._cursor_counts = nxt, self._last_counts
            self.batches += 1
            yield batch

    def __iter__(self) -> "PackedBatchLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._batches()
        return next(self._it)
