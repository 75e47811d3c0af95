"""The flow-matching audio head (``model.heads.audio=flow``, Lipman et al. 2022): the next audio position's
continuous values as a flow from noise, conditioned on the hidden state."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import SILENT_BIN, AudioHead, bins_to_unit
from tml.model.sampling import Generators, SamplingConfig, normal

if TYPE_CHECKING:
    from tml.model.config import FlowHeadConfig, ModelConfig
    from tml.model.embed import MultimodalEmbedding


def _time_features(t: torch.Tensor, width: int) -> torch.Tensor:
    """Flow time t [N] in [0, 1] -> sinusoidal features [N, width] (DiT-style, t scaled by 1000)."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class _AdaLNBlock(nn.Module):
    """``x + gate * mlp(norm(x) * (1 + scale) + shift)`` with (shift, scale, gate) from the condition (DiT / MAR)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.mod = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(F.silu(c)).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowHead(AudioHead):
    """Flow-matching audio head (rectified flow / conditional flow matching, Lipman et al. 2022).

    Models the next audio position's ``frames x n_mels`` unit coordinates ``x1`` (see module docstring) given the
    backbone hidden state ``c``. Path ``x_t = (1 - t) * x0 + t * x1`` from noise ``x0 ~ N(0, I)``; the network
    regresses the velocity ``x1 - x0``. Sampling integrates ``dx/dt = v(x, t, c)`` from t = 0 to 1 with Euler or
    midpoint steps. During training the condition is replaced by a learned null vector with probability
    ``cond_dropout``, so sampling can use classifier-free guidance ``v_u + w * (v_c - v_u)``.
    """

    metric_names = ("audio_flow",)  # loss/audio_flow: the velocity error, named so a dashboard tells it from a CE

    def __init__(self, dim: int, frames: int, n_mels: int, bins: int, cfg: FlowHeadConfig):
        super().__init__()
        self.frames, self.n_mels, self.bins, self.cfg = frames, n_mels, bins, cfg
        d, w = frames * n_mels, cfg.hidden_dim
        self.inp = nn.Linear(d, w)
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond = nn.Linear(dim, w)
        self.blocks = nn.ModuleList(_AdaLNBlock(w) for _ in range(cfg.n_layers))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.out_mod = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, d)
        # Only with dropout: a parameter that never gets a gradient would upset data-parallel reducers.
        self.null = nn.Parameter(torch.zeros(dim)) if cfg.cond_dropout > 0 else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig, embed: MultimodalEmbedding | None = None) -> FlowHead:
        return cls(cfg.dim, cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins, cfg.heads.flow)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        """The AdaLN residual MLP over the frames x n_mels values, conditioned on the hidden state and flow time."""
        d, out, f = cfg.dim, cfg.frames_per_audio_position * cfg.n_mels, cfg.heads.flow
        w = f.hidden_dim
        block = 2 * (w * w + w) + (w * 3 * w + 3 * w)  # mlp (2 linears) + AdaLN modulation
        return ((out * w + w) + 2 * (w * w + w) + (d * w + w) + f.n_layers * block + (w * 2 * w + 2 * w)
                + (w * out + out) + (d if f.cond_dropout > 0 else 0))

    def init_weights(self) -> None:
        """Called after the model's normal(init_std) init of every linear layer: this head starts adaLN-zero."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's fan-in init for the MLP, zeros for every modulation and the output layer (adaLN-zero): the
        head starts as the identity-residual net predicting velocity 0, which trains stably from step one."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        for m in [b.mod for b in self.blocks] + [self.out_mod, self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.null is not None:
            nn.init.normal_(self.null, std=1.0)  # hidden states are RMS-normalised: ~unit scale per channel

    def forward(self, h: torch.Tensor) -> None:
        """The flow head has no logits to keep (its distribution is the flow): ``ModelOutput.audio_logits`` is None."""
        return None

    def velocity(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, frames * n_mels] at flow time t [N], condition c [N, dim] -> velocity [N, frames * n_mels]."""
        cond = self.cond(c) + self.time(_time_features(t, self.cfg.hidden_dim).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.out_mod(F.silu(cond)).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)

    def metrics(self, per_target: torch.Tensor, target: torch.Tensor, pad_id: int | None = None
                ) -> dict[str, torch.Tensor]:
        """``audio_flow``: its loss again (mean squared velocity error per value, in unit coordinates)."""
        return {"audio_flow": per_target}

    def loss(self, c: torch.Tensor, target_bins: torch.Tensor, logits: None = None) -> torch.Tensor:
        """Velocity regression error per target position, fp32 [N] (mean over values and ``train_repeats`` noise
        draws; fresh noise every call).

        Args:
            c: [N, dim] hidden states; target_bins: long [N, frames, n_mels] dMel bins of the next position,
            dequantised uniformly inside their bins (the continuous log-mel they came from is not in the batch).
            logits: unused (the interface's; this head has none).
        """
        n, r = c.shape[0], self.cfg.train_repeats
        c = c.repeat(r, 1)
        bins = target_bins.reshape(n, self.frames * self.n_mels).repeat(r, 1)
        x1 = bins_to_unit(bins, self.bins, torch.rand(bins.shape, device=c.device)).to(c.dtype)
        if self.training and self.null is not None:
            drop = torch.rand(r * n, 1, device=c.device) < self.cfg.cond_dropout
            c = torch.where(drop, self.null.to(c.dtype), c)
        x0 = torch.randn_like(x1)
        t = torch.rand(r * n, device=c.device)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        err = (self.velocity(xt, t, c).float() - (x1 - x0).float()).pow(2).mean(-1)
        return err.view(r, n).mean(0)

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
               logits: None = None, speak: torch.Tensor | None = None) -> torch.Tensor:
        """Next audio position for hidden states h [N, dim] -> unit coordinates [N, frames, n_mels]: the flow
        integrated with ``flow_steps`` / ``flow_solver`` / ``guidance`` from noise scaled by ``flow_temperature``.

        Floor: the flow head has no separate speak/silent probability. Its sample is a draw of the whole position
        from the learned distribution, silence being one of its modes, so at ``flow_temperature`` 1 the decision is
        sampled with the model's own probability whatever ``cfg.floor`` says; ``flow_temperature`` towards 0 is the
        deterministic decoder (the path from the noise's mean), which misses low-probability onsets as argmax does.
        ``speak`` bool [N]: the micro-turn's decision (``FloorHead``): silence (every bin SILENT_BIN, at its centre)
        where False. The flow is integrated for every row either way, so the generator advances the same.
        ``logits``: unused (the interface's).
        """
        unit = self.integrate(h, cfg.flow_steps, cfg.flow_solver, cfg.guidance, generator, cfg.flow_temperature)
        if speak is None:
            return unit
        return torch.where(speak[:, None, None], unit, bins_to_unit(torch.full_like(unit, SILENT_BIN), self.bins))

    @torch.no_grad()
    def integrate(self, c: torch.Tensor, steps: int = 16, solver: str = "midpoint", guidance: float = 1.0,
                  generator: Generators = None, temperature: float = 1.0) -> torch.Tensor:
        """Integrate the flow from noise for hidden states c [N, dim] -> unit coordinates [N, frames, n_mels].

        ``guidance`` 1 is the plain conditional flow; > 1 extrapolates away from the unconditional one (needs a
        head trained with ``cond_dropout > 0``). ``temperature`` scales the starting noise (< 1 trades diversity for
        samples nearer the conditional mode, as in Glow-TTS / Matcha-TTS)."""
        if solver not in ("euler", "midpoint"):
            raise ValueError(f"flow solver {solver!r}: choose euler or midpoint (sampling.flow_solver)")
        if steps < 1:
            raise ValueError(f"flow steps={steps}: need at least 1 (sampling.flow_steps)")
        if guidance != 1.0 and self.null is None:
            raise ValueError(f"guidance={guidance} needs a head trained with model.heads.flow.cond_dropout > 0")
        n = c.shape[0]
        x = temperature * normal((n, self.frames * self.n_mels), generator).to(c.device, c.dtype)

        def v(x: torch.Tensor, t: float) -> torch.Tensor:
            tt = torch.full((n,), t, device=c.device)
            if guidance == 1.0:
                return self.velocity(x, tt, c)
            both = self.velocity(torch.cat([x, x]), torch.cat([tt, tt]),
                                 torch.cat([c, self.null.to(c.dtype).expand(n, -1)]))
            vc, vu = both.chunk(2)
            return vu + guidance * (vc - vu)

        dt = 1.0 / steps
        for i in range(steps):
            t = i * dt
            if solver == "euler":
                x = x + dt * v(x, t)
            else:
                x = x + dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)
        return x.view(n, self.frames, self.n_mels)
