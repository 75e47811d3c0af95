"""Training losses from a ModelOutput and its Batch: the mean of each head's per-target loss (``ModelOutput.*_loss``,
computed by the heads: ``tml.model.heads``), weighted, plus the router auxiliary loss. Only model-output positions
carry targets (see ``tml.streams.batch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tml.model.transformer import ModelOutput
from tml.streams.batch import Batch
from tml.streams.modalities import Kind


def _mean(per_target: torch.Tensor) -> torch.Tensor:
    """Mean over every entry of a head's per-target loss (any shape), fp32. Summed in the order of
    ``F.cross_entropy``'s own mean (``nll_loss``'s cascade over an [M, 1] input; the negations are exact), so text and
    dMel losses and their gradients are bitwise those of the fused call earlier runs logged. With no targets it
    returns a zero that is still attached to the graph (a mean over nothing would be NaN)."""
    x = per_target.float().reshape(-1, 1)
    if x.shape[0] == 0:
        return x.sum()
    return F.nll_loss(-x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def compute_losses(out: ModelOutput, batch: Batch, text_weight: float = 1.0, audio_weight: float = 1.0,
                   text_pad_id: int | None = None, floor_weight: float = 1.0,
                   listen_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """
    Returns scalars:
      loss        text_weight * loss/text + audio_weight * loss/audio + floor_weight * loss/floor
                  + listen_weight * loss/listen + loss/aux (what to backpropagate)
      loss/text   mean CE over the TEXT targets (nats per token)
      loss/audio  the audio head's loss: dmel head: mean CE over every (frame, mel channel) bin prediction of the
                  AUDIO targets (nats per channel); flow head: the velocity regression error (= loss/audio_flow)
      loss/audio_flow  (flow head only) mean squared velocity error per value, in unit coordinates
      loss/aux    router losses summed over MoE layers (already weighted by their coefficients)
      loss/floor  (models with a floor head) mean binary cross-entropy of the speak / stay-silent decision per
                  micro-turn against the reference (nats per micro-turn)
      loss/text_words  (only with ``text_pad_id``; a metric, not trained on separately) mean CE over the TEXT
                  targets that are not the empty-slot token: most model text slots are ``<pad>``, which is easy
                  to predict, so loss/text alone overstates how well the model writes words
      loss/listen (models with a listen head, batches with ``heard_text``) mean CE of the user's transcript token
                  at each labelled user audio position (nats per position)
      loss/listen_words  (with ``text_pad_id``; a metric) the same over the positions where a word is due: how
                  well the model recognises what the user said
    """
    text = _mean(out.text_loss)
    audio = _mean(out.audio_loss)
    aux = out.aux_loss.float()
    losses = {"loss": text_weight * text + audio_weight * audio + aux, "loss/text": text, "loss/audio": audio,
              "loss/aux": aux}
    if out.floor_loss is not None:
        floor = _mean(out.floor_loss)
        losses["loss"] = losses["loss"] + floor_weight * floor
        losses["loss/floor"] = floor
    if out.listen_loss is not None:
        listen = _mean(out.listen_loss)
        losses["loss"] = losses["loss"] + listen_weight * listen
        losses["loss/listen"] = listen
        if text_pad_id is not None:
            with torch.no_grad():
                losses["loss/listen_words"] = _mean(out.listen_loss[out.listen_targets != text_pad_id])
    if out.audio_flow_mse is not None:
        losses["loss/audio_flow"] = audio.detach()
    if text_pad_id is not None:
        words = batch.target_text[batch.target_kind == Kind.TEXT] != text_pad_id
        with torch.no_grad():
            losses["loss/text_words"] = _mean(out.text_loss[words])
    return losses
