"""Training losses from a ModelOutput and its Batch: text CE, audio (dMel per-channel CE or flow-matching velocity
regression), router auxiliary loss. Only model-output positions carry targets (see ``tml.streams.batch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tml.model.transformer import ModelOutput
from tml.streams.batch import Batch
from tml.streams.layout import Kind


def _mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [N, C] against targets [N], in fp32. With N == 0 it returns a zero that is
    still attached to the graph (cross_entropy's mean over nothing would be NaN)."""
    if logits.shape[0] == 0:
        return logits.float().sum()
    return F.cross_entropy(logits.float(), targets)


def compute_losses(out: ModelOutput, batch: Batch, text_weight: float = 1.0, audio_weight: float = 1.0,
                   text_pad_id: int | None = None, floor_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """
    Returns scalars:
      loss        text_weight * loss/text + audio_weight * loss/audio + floor_weight * loss/floor + loss/aux
                  (what to backpropagate)
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
    """
    text_targets = batch.target_text[batch.target_kind == Kind.TEXT]
    text = _mean_ce(out.text_logits, text_targets)
    if out.audio_flow_mse is not None:
        audio = out.audio_flow_mse.float().mean() if out.audio_flow_mse.numel() else out.audio_flow_mse.float().sum()
    else:
        bins = out.audio_logits.shape[-1]
        audio = _mean_ce(out.audio_logits.reshape(-1, bins), batch.target_audio.reshape(-1))
    aux = out.aux_loss.float()
    losses = {"loss": text_weight * text + audio_weight * audio + aux, "loss/text": text, "loss/audio": audio,
              "loss/aux": aux}
    if out.floor_logits is not None:
        floor = (F.binary_cross_entropy_with_logits(out.floor_logits.float(), out.floor_targets)
                 if out.floor_logits.numel() else out.floor_logits.float().sum())
        losses["loss"] = losses["loss"] + floor_weight * floor
        losses["loss/floor"] = floor
    if out.audio_flow_mse is not None:
        losses["loss/audio_flow"] = audio.detach()
    if text_pad_id is not None:
        words = text_targets != text_pad_id
        with torch.no_grad():
            losses["loss/text_words"] = _mean_ce(out.text_logits[words], text_targets[words])
    return losses
