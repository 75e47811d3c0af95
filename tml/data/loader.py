"""webdataset shards -> a resumable, rank- and worker-aware stream of packed ``Batch`` es.

Split. Every epoch the shard list is shuffled with ``seed + epoch``. There are ``world_size * W`` readers
(``W = max(1, num_workers)`` per rank; nodes are just ranks): reader ``rank * W + w`` reads shards
``reader, reader + world_size * W, ...`` of the shuffled list, samples in file order. So every sample is read
exactly once per epoch across all ranks and workers.

Order. Reader (worker) ``w`` of a rank decodes, checks and interleaves its episodes (in a DataLoader worker
process when ``num_workers > 0``); the rank takes one episode from each worker in turn (w = 0, 1, ..., W-1, 0, ...),
which is the DataLoader's in-order round robin, and packs them into rows (``tml.streams.pack``).

Resume. The loader's state after a batch holds, per worker, where it resumes reading (epoch, shard index, sample
index), which worker delivers next, and the micro-turn offset inside the first episode of the next row. A loader
rebuilt from it (same world size and num_workers) yields exactly the batches an uninterrupted one would have, and
skips what was already read without decoding it.

Bad input is skipped, counted by reason and named (shard, key, reason) in a warning: a shard whose sha256 differs
from manifest.json (``verify``; all its episodes), a shard that yields fewer episodes than manifest.json lists (the
missing ones), unreadable tar (the rest of that shard), unreadable audio or JSON, wrong sample rate (resampled, or rejected with ``resample=false``),
NaN/inf samples, empty or mis-timed text, streams of different lengths (``tml.data.checks``). More than
``max_bad_fraction`` bad samples (after at least ``min_samples_for_bad_fraction``) stops the run with a DataError.
The loader only reads: nothing on disk is ever modified.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tml.audio.dmel import DMelTokenizer
from tml.checksum import sha256
from tml.data.checks import check_episode
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
    num_workers: int = 0  # DataLoader worker processes per rank; 0 = read in the training process
    max_bad_fraction: float = 0.05
    min_samples_for_bad_fraction: int = 20  # judge the fraction only after this many samples
    resample: bool = True  # episodes at another sample rate: resample (true) or reject as bad (false)
    length_tolerance_s: float = 0.2  # allowed mismatch between stream lengths and the episode duration
    # Shard integrity against manifest.json. Episode counts are always checked (a shard that ends early counts its
    # lost episodes as bad). sha256: hash every shard at start and skip (count as bad) a shard whose hash differs;
    # auto: sha256 when the shards total at most verify_auto_max_gb, else count only; count: counts only.
    verify: str = "auto"  # auto | sha256 | count
    verify_auto_max_gb: float = 2.0


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


@dataclass
class BadSample:
    """Skipped samples: where (shard:key) and why (a short reason code plus the message); ``count`` > 1 when a
    damaged shard loses several episodes at once."""

    where: str
    reason: str
    message: str
    count: int = 1


def verify_shards(data_dir: str | Path, manifest: dict, mode: str = "auto", auto_max_gb: float = 2.0
                  ) -> dict[str, str]:
    """Hash the shards against manifest.json's sha256 (per ``mode``, see ``LoaderConfig.verify``).

    Returns {shard name: why it is damaged} for every shard whose hash differs; logs which mode ran."""
    if mode not in ("auto", "sha256", "count"):
        raise DataError(f"data.loader.verify={mode!r}: choose auto, sha256 or count")
    shards = manifest["shards"]
    if mode == "count":
        return {}
    data_dir = Path(data_dir)
    unhashed = [s["name"] for s in shards if not s.get("sha256")]
    if unhashed:
        if mode == "sha256":
            raise DataError(f"data.loader.verify=sha256 but {data_dir / 'manifest.json'} has no sha256 for "
                            f"{unhashed[:5]}: regenerate the data set or set data.loader.verify=count")
        return {}
    total = sum((data_dir / s["name"]).stat().st_size for s in shards)
    if mode == "auto" and total > auto_max_gb * 2**30:
        log.info("data.loader.verify=auto: %d shards (%.1f GB) exceed verify_auto_max_gb=%.1f; checking episode "
                 "counts only", len(shards), total / 2**30, auto_max_gb)
        return {}
    t0 = time.perf_counter()
    damaged = {}
    for s in shards:
        got = sha256(data_dir / s["name"])
        if got != s["sha256"]:
            damaged[s["name"]] = (f"sha256 {got[:12]}... differs from manifest.json's {s['sha256'][:12]}... (the "
                                  f"file changed or is damaged)")
    log.info("verified sha256 of %d shards (%.1f MB) in %.1f s: %d damaged", len(shards), total / 2**20,
             time.perf_counter() - t0, len(damaged))
    for name, why in damaged.items():
        log.warning("shard %s: %s; its %s episodes will be skipped and counted as bad", data_dir / name, why,
                    next(s.get("episodes", "?") for s in shards if s["name"] == name))
    return damaged


class ShardEpisodeSource:
    """Episodes of one reader (rank x worker), in a deterministic order that can be re-entered at any
    (epoch, shard index, sample index)."""

    def __init__(self, data_dir: str | Path, rank: int, world_size: int, seed: int, num_workers: int = 0,
                 verify: str = "count", verify_auto_max_gb: float = 2.0):
        self.data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        self.shards = [s["name"] for s in manifest["shards"]]
        self.expected = {s["name"]: s.get("episodes") for s in manifest["shards"]}  # episodes per shard, if listed
        self.damaged = verify_shards(data_dir, manifest, verify, verify_auto_max_gb)  # shard -> why
        self.workers = max(1, num_workers)
        readers = world_size * self.workers
        if len(self.shards) < readers:
            raise DataError(f"{self.data_dir} has {len(self.shards)} shards but there are {world_size} data-parallel "
                            f"ranks x {self.workers} data.loader.num_workers = {readers} readers; every reader needs "
                            f"a shard: lower data.loader.num_workers or regenerate with a smaller --shard-size")
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def rank_shards(self, epoch: int, worker: int = 0) -> list[str]:
        order = list(self.shards)
        random.Random(self.seed + epoch).shuffle(order)
        return order[self.rank * self.workers + worker :: self.world_size * self.workers]

    def iterate(self, start: tuple[int, int, int] = (0, 0, 0), worker: int = 0
                ) -> Iterator[tuple[tuple[int, int, int], Episode | BadSample]]:
        """Yield ((epoch, shard index, sample index), Episode or BadSample) forever, starting at ``start``."""
        epoch, shard_i, sample_i = start
        while True:
            shards = self.rank_shards(epoch, worker)
            good = 0
            for si in range(shard_i, len(shards)):
                url = str(self.data_dir / shards[si])
                expected = self.expected.get(shards[si])
                if shards[si] in self.damaged:
                    yield (epoch, si, 0), BadSample(url, "sha256_mismatch", f"shard {url}: "
                                                    f"{self.damaged[shards[si]]}; all its {expected} episodes skipped",
                                                    count=expected or 1)
                    sample_i = 0
                    continue
                k, key = -1, None
                try:
                    for k, sample in enumerate(wds.tarfile_samples([{"url": url}])):
                        if k < sample_i:
                            continue  # resume: skip without decoding
                        key = sample.get("__key__")
                        try:
                            episode = Episode.from_sample(sample)
                        except EpisodeError as e:
                            yield (epoch, si, k), BadSample(f"{url}:{key}", e.reason, str(e))
                            continue
                        good += 1
                        yield (epoch, si, k), episode
                except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as e:
                    after = f"after key {key}" if key is not None else "from the start"
                    lost = max(1, expected - (k + 1)) if expected else 1
                    yield (epoch, si, k + 1), BadSample(f"{url} ({after})", "corrupt_tar",
                                                        f"rest of shard {url} {after}: not readable as tar ({e}); "
                                                        f"{lost} episode(s) lost", count=lost)
                else:
                    # A tar damaged inside can also end early without an error: count against the manifest.
                    if expected and k + 1 < expected:
                        after = f"after key {key}" if key is not None else "from the start"
                        yield (epoch, si, k + 1), BadSample(
                            f"{url} ({after})", "missing_episodes",
                            f"shard {url} ends {after} with {k + 1} of the {expected} episodes manifest.json lists: "
                            f"{expected - k - 1} lost (the shard is damaged or truncated)", count=expected - k - 1)
                sample_i = 0
            if good == 0 and start == (epoch, 0, 0):
                raise DataError(f"reader {self.rank}/{worker} found no readable sample in a whole epoch of its shards "
                                f"{shards}; check the data set in {self.data_dir}")
            epoch, shard_i, sample_i = epoch + 1, 0, 0
            start = (epoch, 0, 0)


class _TokenStream(IterableDataset):
    """One rank's readers as a DataLoader dataset: each worker process (or the training process, with no workers)
    decodes, checks and interleaves its episodes. Yields (worker, (epoch, shard, sample), EpisodeTokens or None,
    [BadSample, ...] skipped just before it)."""

    def __init__(self, source: ShardEpisodeSource, starts: list[tuple], rotation: int, cfg: LoaderConfig,
                 layout: MicroTurnLayout, dmel: DMelTokenizer, text: TextTokenizer):
        self.source, self.starts, self.rotation = source, starts, rotation
        self.cfg, self.layout, self.dmel, self.text = cfg, layout, dmel, text

    def __iter__(self):
        info = get_worker_info()
        n = self.source.workers
        # The DataLoader asks worker 0 first; rotating lets a resumed loader continue with the worker that was next.
        w = ((info.id if info else 0) + self.rotation) % n
        if info is not None:
            torch.set_num_threads(1)
        skipped: list[BadSample] = []
        for pos, item in self.source.iterate(tuple(self.starts[w]), w):
            if isinstance(item, BadSample):
                skipped.append(item)
                continue
            try:
                check_episode(item, self.layout.cfg.sample_rate, self.cfg.resample, self.cfg.length_tolerance_s)
                tok = interleave(item, self.layout, self.dmel, self.text)
            except EpisodeError as e:
                skipped.append(BadSample(f"{self.source.data_dir / self.source.rank_shards(pos[0], w)[pos[1]]}:"
                                         f"{item.key}", e.reason, str(e)))
                continue
            yield w, pos, tok, skipped
            skipped = []


class PackedBatchLoader:
    """Iterator of packed ``Batch`` es of shape [micro_batch_size, seq_len] for one rank, with exact resume.

    ``state_dict()`` after a batch names where the next batch starts; ``load_state_dict`` re-enters there.
    """

    def __init__(self, data_dir: str | Path, cfg: LoaderConfig, layout: MicroTurnLayout, dmel: DMelTokenizer,
                 text: TextTokenizer, rank: int = 0, world_size: int = 1):
        if cfg.seq_len < layout.length:
            raise DataError(f"data.loader.seq_len={cfg.seq_len} is shorter than one micro-turn "
                            f"({layout.length} positions: {layout.describe()}); raise it")
        if cfg.num_workers < 0:
            raise DataError(f"data.loader.num_workers={cfg.num_workers}: must be >= 0")
        self.cfg, self.layout, self.dmel, self.text = cfg, layout, dmel, text
        self.source = ShardEpisodeSource(data_dir, rank, world_size, cfg.seed, cfg.num_workers, cfg.verify,
                                         cfg.verify_auto_max_gb)
        self.world_size = world_size
        W = self.source.workers
        # Resume state: per worker the next read position, which worker delivers next, counters.
        self._state = {"workers": [[0, 0, 0] for _ in range(W)], "next_worker": 0, "turn_offset": 0,
                       "batches": 0, "seen": 0, "bad": 0, "dropped_text": 0, "bad_by_reason": {}}
        self._live = dict(self._state, workers=[list(p) for p in self._state["workers"]], bad_by_reason={})
        self._before_last: dict = self._state
        self.bad_samples: list[BadSample] = []  # the most recent skipped samples (at most 100), for reports
        self._it: Iterator[Batch] | None = None
        self._dl: DataLoader | None = None

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**json.loads(json.dumps(self._state)), "world_size": self.world_size,
                "num_workers": self.cfg.num_workers}

    def load_state_dict(self, state: dict) -> None:
        """Re-enter where ``state`` says; ``{"restart_epoch": E}`` (a checkpoint from another world size, see
        ``tml.train.checkpoint.resharded_loader_state``) starts epoch E from its first sample instead."""
        if "restart_epoch" in state:
            self.close()
            E = int(state["restart_epoch"])
            self._state = dict(self._state, workers=[[E, 0, 0] for _ in self._state["workers"]], next_worker=0,
                               turn_offset=0)
            self._live = json.loads(json.dumps(self._state))
            self._it = None
            return
        for key, have in (("world_size", self.world_size), ("num_workers", self.cfg.num_workers)):
            if key in state and int(state[key]) != have:
                where = "data-parallel world size" if key == "world_size" else "data.loader.num_workers"
                raise DataError(f"the loader state was saved with {key}={state[key]} but this run has {have}; "
                                f"exact resume needs the same {where}")
        if "workers" not in state:
            raise DataError("the loader state has no per-worker positions (saved by an older tml); "
                            "start a fresh run or resume with that version")
        self.close()
        self._state = json.loads(json.dumps({k: state[k] for k in self._state}))
        self._live = json.loads(json.dumps(self._state))
        self._it = None

    def stats(self) -> dict:
        s = self._state
        return {"data/episodes_seen": s["seen"], "data/bad_samples": s["bad"],
                "data/dropped_text_tokens": s["dropped_text"]}

    @property
    def bad_by_reason(self) -> dict[str, int]:
        return dict(self._state["bad_by_reason"])

    # -- iteration ---------------------------------------------------------------------------------------------
    def episodes(self) -> Iterator[tuple[tuple, EpisodeTokens]]:
        """The rank's stream of ((worker, epoch, shard, sample), EpisodeTokens) that the packer consumes, from the
        current state; counts and skips bad samples on the way."""
        s = self._state
        ds = _TokenStream(self.source, s["workers"], s["next_worker"], self.cfg, self.layout, self.dmel, self.text)
        if self.cfg.num_workers == 0:
            items = iter(ds)
        else:
            self._dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, in_order=True,
                                  persistent_workers=False)
            items = iter(self._dl)
        live = self._live
        cfg = self.cfg
        for w, pos, tok, skipped in items:
            # The packer's cursor always names the episode it pulled last, so the state before this episode is the
            # state to resume from if this episode turns out to be the first of the next row.
            self._before_last = json.loads(json.dumps(dict(live, next_worker=w)))
            for b in skipped:
                live["seen"] += b.count
                live["bad"] += b.count
                live["bad_by_reason"][b.reason] = live["bad_by_reason"].get(b.reason, 0) + b.count
                self.bad_samples = (self.bad_samples + [b])[-100:]
                log.warning("skipping %s [%s]: %s (bad samples so far: %d of %d)", b.where, b.reason, b.message,
                            live["bad"], live["seen"])
            live["seen"] += 1
            live["workers"][w] = [pos[0], pos[1], pos[2] + 1]
            live["dropped_text"] += tok.dropped_text
            if live["seen"] >= cfg.min_samples_for_bad_fraction and live["bad"] > cfg.max_bad_fraction * live["seen"]:
                raise DataError(f"{live['bad']} of {live['seen']} samples in {self.source.data_dir} are bad "
                                f"(> data.loader.max_bad_fraction={cfg.max_bad_fraction}); by reason: "
                                f"{live['bad_by_reason']}; last: {self.bad_samples[-1].where}: "
                                f"{self.bad_samples[-1].message}")
            yield (w, *pos), tok

    def _batches(self) -> Iterator[Batch]:
        rows = pack_rows(self.episodes(), self.cfg.seq_len, self.layout.length,
                         start_offset=self._state["turn_offset"])
        while True:
            group = []
            for _ in range(self.cfg.micro_batch_size):
                pieces, nxt = next(rows)
                group.append(pieces)
            batch = collate(group, self.cfg.seq_len)
            self._state = dict(self._before_last, turn_offset=nxt.turn_offset,
                               batches=self._state["batches"] + 1)
            yield batch

    def __iter__(self) -> "PackedBatchLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._batches()
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes (a new iteration starts them again)."""
        self._it = None
        if self._dl is not None:
            self._dl = None
