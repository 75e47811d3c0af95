"""Training losses from a ModelOutput: the mean of each head's per-target loss (``ModelOutput.losses``, computed by
the heads: ``tml.model.heads``), weighted, plus the router auxiliary loss; and each head's further metrics. Only
model-output positions carry targets (see ``tml.streams.batch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tml.model.config import HEADS
from tml.model.transformer import ModelOutput
from tml.streams.batch import Batch


def _mean(per_target: torch.Tensor) -> torch.Tensor:
    """Mean over every entry of a head's per-target loss (any shape), fp32. Summed in the order of
    ``F.cross_entropy``'s own mean (``nll_loss``'s cascade over an [M, 1] input; the negations are exact), so text and
    dMel losses and their gradients are bitwise those of the fused call earlier runs logged. With no targets it
    returns a zero that is still attached to the graph (a mean over nothing would be NaN)."""
    x = per_target.float().reshape(-1, 1)
    if x.shape[0] == 0:
        return x.sum()
    return F.nll_loss(-x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def per_target_losses(out: ModelOutput, text_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """What ``compute_losses`` averages, by its name, before the mean: ``loss/<head>`` (each head's loss per target,
    with the graph) and then that head's metrics ``loss/<metric>`` (``OutputHead.metrics``, detached). The first dim
    of each counts the targets it is a mean over (validation weights ranks' means by it)."""
    per = {}
    for name, loss in out.losses.items():  # the heads with targets in this batch, in build order
        per[f"loss/{name}"] = loss
        with torch.no_grad():
            for metric, entries in out.heads[name].metrics(loss, out.targets[name], text_pad_id).items():
                per[f"loss/{metric}"] = entries
    return per


def compute_losses(out: ModelOutput, batch: Batch, text_pad_id: int | None = None,
                   **weights: float) -> dict[str, torch.Tensor]:
    """
    ``weights``: ``<head>_weight=w`` scales that head's loss in ``loss`` (1 for a head not named; a name of a head
    this model lacks is ignored, so a trainer can pass every weight it has). ``text_pad_id``: the empty-slot token,
    for ``loss/text_words``. ``batch``: the batch ``out`` came from (the heads took their targets from it already).

    Returns scalars:
      loss        the weighted content heads' losses (text, audio), plus loss/aux, plus the other heads' (floor), in
                  that order (what to backpropagate; summed as earlier runs did, so it rounds the same)
      loss/aux    router losses summed over MoE layers (already weighted by their coefficients)
      loss/<head> the mean of the head's loss over its targets (heads with labels in this batch):
                  loss/text   CE over the TEXT targets (nats per token)
                  loss/audio  dmel head: CE over every (frame, mel channel) bin prediction of the AUDIO targets (nats
                              per channel); flow head: the velocity regression error (= loss/audio_flow)
                  loss/floor  (with a floor head) binary cross-entropy of the speak / stay-silent decision per
                              micro-turn against the reference (nats per micro-turn)
      loss/<metric>  each head's metrics (not trained on): loss/text_words (only with ``text_pad_id``), the CE of
                  the TEXT targets that are not the empty-slot token; loss/audio_flow (flow head), the mean squared
                  velocity error per value in unit coordinates
    """
    unknown = sorted(k for k in weights if not (k.endswith("_weight") and k.removesuffix("_weight") in HEADS))
    if unknown:
        raise TypeError(f"compute_losses: unknown weights {unknown}; pass <head>_weight for a head in "
                        f"tml.model.config.HEADS ({', '.join(HEADS)})")
    per = per_target_losses(out, text_pad_id)
    means = {name: _mean(per[f"loss/{name}"]) for name in out.losses}
    aux = out.aux_loss.float()
    weighted = {name: weights.get(f"{name}_weight", 1.0) * means[name] for name in out.losses}
    content = [weighted[name] for name in out.losses if out.heads[name].kind is not None]
    total = content[0]
    for term in content[1:]:
        total = total + term
    total = total + aux
    for name in out.losses:
        if out.heads[name].kind is None:
            total = total + weighted[name]
    losses = {"loss": total, **{f"loss/{name}": m for name, m in means.items()}, "loss/aux": aux}
    with torch.no_grad():
        losses.update({k: _mean(v) for k, v in per.items() if k not in losses})
    return losses
