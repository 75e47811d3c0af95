"""Sampling the model's outputs: temperature / top-p for text and dMel logits, ODE steps and guidance for flow.

    cfg = SamplingConfig(text_temperature=0.8, audio_top_p=0.9, flow_steps=16)
    token = sample_logits(model.text_head(h), cfg.text_temperature, cfg.text_top_p, gen)   # [N]
    unit = sample_audio(model.audio_head, h, cfg, gen)                                      # [N, frames, n_mels]
    bins = unit_to_bins(unit, model.cfg.dmel_bins)          # what the dMel bag reads back as the next input
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tml.model.heads import DMelHead, FlowHead, bins_to_unit


@dataclass
class SamplingConfig:
    text_temperature: float = 1.0  # 0 = argmax
    text_top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    audio_temperature: float = 1.0  # dmel head, per channel; 0 = argmax
    audio_top_p: float = 1.0
    flow_steps: int = 16  # flow head: ODE steps from noise (t = 0) to data (t = 1)
    flow_solver: str = "midpoint"  # euler | midpoint (2 head evaluations per step)
    guidance: float = 1.0  # flow head classifier-free guidance scale (1 = off; > 1 needs cond_dropout > 0)
    seed: int = 0

    def validate(self) -> "SamplingConfig":
        for key in ("text_temperature", "audio_temperature"):
            if getattr(self, key) < 0:
                raise ValueError(f"sampling.{key}={getattr(self, key)}: must be >= 0 (0 = argmax)")
        for key in ("text_top_p", "audio_top_p"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"sampling.{key}={getattr(self, key)}: must be in (0, 1]")
        if self.flow_steps < 1 or self.flow_solver not in ("euler", "midpoint"):
            raise ValueError(f"sampling.flow_steps={self.flow_steps} must be >= 1 and sampling.flow_solver="
                             f"{self.flow_solver!r} one of euler, midpoint")
        if self.guidance < 0:
            raise ValueError(f"sampling.guidance={self.guidance}: must be >= 0 (1 = no guidance)")
        return self


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one class per row of logits [..., K] -> long [...].

    temperature 0 is argmax; otherwise softmax(logits / temperature) restricted to the nucleus: the classes in
    descending probability up to and including the first at which the cumulative probability reaches ``top_p``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    shape, k = logits.shape[:-1], logits.shape[-1]
    probs = (logits.float().reshape(-1, k) / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep a class if the mass strictly before it is still short of top_p (so the top class always stays)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    draw = torch.multinomial(probs, 1, generator=generator)
    return draw.view(shape)


@torch.no_grad()
def sample_audio(head: DMelHead | FlowHead, h: torch.Tensor, cfg: SamplingConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next audio position for hidden states h [N, dim] -> unit coordinates [N, frames, n_mels] (see
    ``tml.model.heads``): the flow head's continuous sample, or the dMel head's sampled bins at their centres."""
    if isinstance(head, FlowHead):
        return head.sample(h, cfg.flow_steps, cfg.flow_solver, cfg.guidance, generator)
    bins = sample_logits(head(h), cfg.audio_temperature, cfg.audio_top_p, generator)
    return bins_to_unit(bins, head.bins)
