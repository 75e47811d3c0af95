"""Held-out validation loss during training: a fixed set of packed batches from ``data.val_path``, scored every
``trainer.val_every`` steps with the training forward (teacher forced), per stream.

The batches are built once (the first ``data.val_batches`` batches of the held-out shards, packed exactly like
training rows, with the training run's tokenizer, layout and dMel), so every evaluation scores the same positions
and the curve shows generalisation, not a changing sample. Ranks split the batches and sum their results.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from tml.audio.dmel import DMelTokenizer
from tml.data.loader import LoaderConfig, PackedBatchLoader, read_manifest
from tml.model.losses import compute_losses, per_target_losses
from tml.streams.batch import Batch
from tml.streams.layout import MicroTurnLayout
from tml.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

def validation_batches(path: str, n_batches: int, loader_cfg: LoaderConfig, layout: MicroTurnLayout,
                       dmel: DMelTokenizer, text: TextTokenizer, rank: int = 0, world_size: int = 1) -> list[Batch]:
    """This rank's share of the first ``n_batches`` batches of ``path`` (each [micro_batch_size, seq_len]).

    Fewer when the set is smaller than ``n_batches`` batches (it is never read twice); the count is logged.
    """
    manifest = read_manifest(path)
    total = sum(int(sh.get("episodes", 0)) for sh in manifest["shards"]) or int(manifest.get("episodes", 0))
    # One reader in this process, a fixed shard order: the same batches on every run and every evaluation.
    loader = PackedBatchLoader(path, dataclasses.replace(loader_cfg, num_workers=0, seed=0), layout, dmel, text)
    batches = []
    while len(batches) < n_batches:
        batch = next(loader)
        # Episodes pulled so far (the live count: the last one may continue into the next row). More than the set
        # holds: this batch wrapped into a second pass.
        if total and loader._live["seen"] > total:
            break
        batches.append(batch)
    loader.close()
    if len(batches) < n_batches:
        log.warning("data.val_batches=%d but %s (%d episodes) fills only %d batches: using %d", n_batches, path,
                    total, len(batches), len(batches))
    return batches[rank::world_size]


@torch.no_grad()
def validation_losses(engine, batches: list[Batch], device, text_pad_id: int) -> dict[str, float]:
    """Teacher-forced losses of ``engine`` (a DeepSpeed engine or the model itself) over ``batches`` (this rank's)
    summed over ranks: ``val/<name>`` for each per-head loss ``compute_losses`` reports
    (``InteractionModel.loss_names``: ``val/loss/text``, ``val/loss/text_words``, ``val/loss/audio``,
    ``val/loss/floor`` with a floor head, ...; each a mean over its own targets: text slots, non-pad text slots, audio
    channel bins, micro-turns; a content head's NaN with none, another head's left out), ``val/loss`` (the sum of
    the content heads' losses, text + audio) and ``val/positions``."""
    module = getattr(engine, "module", engine)
    names = module.loss_names()  # the same on every rank, also on one with no batches
    sums = torch.zeros(2 * len(names) + 1, dtype=torch.float64)  # (loss * count, count) per name, positions
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            batch = batch.to(device)
            out = engine(batch)
            losses = compute_losses(out, batch, text_pad_id=text_pad_id)
            # Each loss is a mean over its head's targets (the first dim of its per-target loss): weight it by them.
            counts = {k: v.shape[0] for k, v in per_target_losses(out, text_pad_id).items()}
            for i, k in enumerate(names):
                if counts.get(k):
                    sums[2 * i] += float(losses[k]) * counts[k]
                    sums[2 * i + 1] += counts[k]
            sums[-1] += batch.num_tokens()
    finally:
        module.train(was_training)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    # A content head's losses are always reported (NaN without targets); another head's only where it had some.
    heads = module.output_heads()
    content = {f"loss/{n}" for name, head in heads.items() if head.kind is not None for n in (name, *head.metric_names)}
    out = {f"val/{k}": float(sums[2 * i] / sums[2 * i + 1]) if sums[2 * i + 1] else math.nan
           for i, k in enumerate(names) if sums[2 * i + 1] or k in content}
    out["val/loss"] = sum(out[f"val/loss/{name}"] for name, head in heads.items() if head.kind is not None)
    out["val/positions"] = int(sums[-1])
    return out
