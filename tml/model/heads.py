"""Output heads on the final hidden state: text logits, dMel logits, the flow-matching audio head, the floor head,
and the listen head (a training signal: the user's transcript where it is heard).

Audio values shared by both audio heads: a *unit coordinate* ``y`` in [-1, 1] that spans the dMel range linearly,
``y = 2 * (bin + u) / bins - 1`` with ``u`` in [0, 1) the position inside the bin. So ``y`` is a normalised clipped
log-mel (``log_min + (y + 1) / 2 * (log_max - log_min)``), bin ``k``'s centre is ``u = 0.5``, and quantising ``y``
gives back the bin the dMel bag reads. The model needs no knowledge of the log-mel range.

Every head has the same methods, so the model, the losses, the parameter counts, the streaming step and free
generation never ask which head they hold:

- ``forward(h)``: what the training forward keeps for inspection (logits; ``None`` for the flow head, which has
  none), ``ModelOutput.text_logits`` / ``audio_logits`` / ``floor_logits``;
- ``loss(h, target, logits=None)``: the loss of each target position, fp32 ``[N, ...]`` (``compute_losses``
  averages it over all its entries); ``logits``: ``forward(h)`` if the caller has it already;
- ``sample(h, cfg, generator, ...)`` (``tml.model.sampling.SamplingConfig``): first the floor decision (speak or
  stay silent), then the content given speech. Audio heads return unit coordinates and take the micro-turn's
  decision ``speak`` (from ``FloorHead``) when there is one. ``generator``: one for all rows, or a list with one
  per row (``tml.model.sampling.Generators``: a batched session's rows, each drawing what it draws alone);
- ``num_params(cfg)``: the parameter count from a ``ModelConfig`` alone (``tml.model.counts``);
- ``init_weights()``: the head's own start, after the model's normal(init_std) init of every linear layer.

The model builds its audio head from ``AUDIO_HEADS[cfg.heads.audio]`` (``from_config``).

The floor decision has its own head, ``FloorHead``: once per micro-turn, before its first output slot, it gives
P(the model speaks in this micro-turn's audio). Deciding once per micro-turn instead of once per 40 ms audio
position matters: a stop hazard of 0.05 per position compounds to 1 - 0.95^5 = 0.23 per micro-turn, so a turn
sampled position by position breaks off after a second or two, and a model that hears its own silence takes the
break for the end of its turn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.config import FlowHeadConfig, ModelConfig
from tml.model.sampling import Generators, SamplingConfig, decide_floor, normal, sample_logits
from tml.streams.batch import Batch
from tml.streams.layout import Stream
from tml.streams.modalities import Kind

# The dMel bin of silence: digital silence (log10 eps = -10) and everything below the kept range's floor clip to the
# lowest bin (``tml.audio.dmel``), so a silent audio position is all bins 0.
SILENT_BIN = 0


def bins_to_unit(bins: torch.Tensor, n_bins: int, u: torch.Tensor | float = 0.5) -> torch.Tensor:
    """Bin ids (any shape) -> unit coordinates in [-1, 1]; ``u`` in [0, 1) is the offset inside the bin."""
    return 2.0 * (bins.float() + u) / n_bins - 1.0


def unit_to_bins(y: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Unit coordinates (any shape) -> bin ids in [0, n_bins); values outside [-1, 1] clip to the end bins."""
    return torch.floor((y + 1.0) / 2.0 * n_bins).long().clamp_(0, n_bins - 1)


class TextHead(nn.Module):
    """Hidden [N, dim] -> next-token logits [N, vocab]. Optionally shares its weight with the text embedding."""

    def __init__(self, dim: int, vocab_size: int, tied_weight: nn.Parameter | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)
        if tied_weight is not None:
            self.proj.weight = tied_weight

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return 0 if cfg.heads.text == "tied" else cfg.vocab_size * cfg.dim  # tied: the embedding's weight

    def init_weights(self) -> None:
        """Called after the model's normal(init_std) init of every linear layer: that init is this head's."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (nats) of each target token: hidden [N, dim], target long [N] -> fp32 [N]."""
        logits = self(h) if logits is None else logits
        return F.cross_entropy(logits.float(), target, reduction="none")

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
               pad_id: int = 0, logits: torch.Tensor | None = None, speak: torch.Tensor | None = None,
               p_speak: torch.Tensor | None = None) -> torch.Tensor:
        """Next token for hidden states h [N, dim] -> long [N] (``pad_id`` = this slot stays empty).

        Floor: write with probability P(not pad) = 1 - softmax(logits)[pad] (``cfg.floor``; the model's probability
        as trained, no temperature), then the word among the non-pad tokens with ``text_temperature`` /
        ``text_top_p`` (0 = greedy). ``floor="none"``: one draw over all tokens, pad included. ``logits`` [N, vocab]:
        ``self(h)`` if the caller has it already. ``speak`` bool [N]: the micro-turn's decision (``FloorHead``):
        ``pad_id`` where False; where True the slot still decides for itself whether it holds a word (a speaking
        micro-turn has empty text slots too). Every row draws either way, so the generator advances the same.
        ``p_speak`` float [N]: the floor head's P(speak) behind ``speak``; with ``cfg.words_given_speech`` a
        speaking slot writes with P(word | speak) = min(1, P(word) / P(speak)) instead of P(word).
        """
        logits = self(h) if logits is None else logits
        if cfg.floor == "none":
            token = sample_logits(logits, cfg.text_temperature, cfg.text_top_p, generator)
        else:
            p_word = 1.0 - logits.float().softmax(-1)[:, pad_id]
            if speak is not None and p_speak is not None and cfg.words_given_speech:
                p_word = torch.where(speak, (p_word / p_speak.float().clamp_min(1e-6)).clamp_max(1.0), p_word)
            writes = decide_floor(p_word, cfg.floor, generator)
            words = logits.float().index_fill(-1, torch.tensor([pad_id], device=logits.device), float("-inf"))
            word = sample_logits(words, cfg.text_temperature, cfg.text_top_p, generator)
            token = torch.where(writes, word, torch.full_like(word, pad_id))
        return token if speak is None else torch.where(speak, token, torch.full_like(token, pad_id))


class DMelHead(nn.Module):
    """Hidden [N, dim] -> dMel logits [N, frames, n_mels, bins]: an independent ``bins``-way classification per
    (stacked frame, mel channel) of the next audio position."""

    def __init__(self, dim: int, frames: int, n_mels: int, bins: int):
        super().__init__()
        self.frames, self.n_mels, self.bins = frames, n_mels, bins
        self.proj = nn.Linear(dim, frames * n_mels * bins, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> DMelHead:
        return cls(cfg.dim, cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.dim * cfg.frames_per_audio_position * cfg.n_mels * cfg.dmel_bins  # one linear layer

    def init_weights(self) -> None:
        """Called after the model's normal(init_std) init of every linear layer: that init is this head's."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).view(h.shape[0], self.frames, self.n_mels, self.bins)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (nats) of each (frame, mel channel) bin of each target position: hidden [N, dim], target
        bins long [N, frames, n_mels] -> fp32 [N, frames, n_mels]."""
        logits = self(h) if logits is None else logits
        return F.cross_entropy(logits.float().reshape(-1, self.bins), target.reshape(-1),
                               reduction="none").view(target.shape)

    def log_prob(self, h: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Exact log-likelihood (nats) of bin ids [N, frames, n_mels] given hidden [N, dim] -> [N]: channels are
        independent given the hidden state, so it is the sum of per-channel log-softmax entries."""
        logp = self(h).float().log_softmax(-1)
        return logp.gather(-1, bins.unsqueeze(-1)).squeeze(-1).sum((1, 2))

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
               logits: torch.Tensor | None = None, speak: torch.Tensor | None = None) -> torch.Tensor:
        """Next audio position for hidden states h [N, dim] -> unit coordinates [N, frames, n_mels] at bin centres.

        Floor: one speak/silent draw per 40 ms position (``cfg.floor``) from P(speak) = the mean over its frames and
        channels of P(bin != SILENT_BIN); silent means every bin is SILENT_BIN. Given speech, each channel's bin comes
        from its distribution with the silent positions' share taken out of the silent bin, i.e. P(b | speak) ~
        max(P(b) - (1 - P(speak)) [b = SILENT_BIN], 0) (a channel that is quieter than the position on average keeps
        some silent mass), drawn with ``audio_temperature`` / ``audio_top_p`` (0 = greedy). ``floor="none"``: every
        channel's bin drawn from its full distribution. ``logits`` [N, frames, n_mels, bins]: ``self(h)`` if known.
        ``speak`` bool [N]: the decision already taken (by ``FloorHead`` for the whole micro-turn): only the content
        is drawn, given speech where True; silence where False.
        """
        logits = self(h) if logits is None else logits
        if cfg.floor == "none" and speak is None:
            return bins_to_unit(sample_logits(logits, cfg.audio_temperature, cfg.audio_top_p, generator), self.bins)
        p = logits.float().softmax(-1)  # [N, S, C, bins]
        p_silent_bin = p[..., SILENT_BIN]
        p_speak = 1.0 - p_silent_bin.mean((1, 2))  # [N]
        if speak is None:
            speak = decide_floor(p_speak, cfg.floor, generator)
        given = p.clone()
        given[..., SILENT_BIN] = (p_silent_bin - (1.0 - p_speak)[:, None, None]).clamp_min(0.0)
        bins = sample_logits(given.log(), cfg.audio_temperature, cfg.audio_top_p, generator)
        return bins_to_unit(torch.where(speak[:, None, None], bins, SILENT_BIN), self.bins)


class FloorHead(nn.Module):
    """Hidden [N, dim] -> logit [N] of P(the model speaks in this micro-turn): the speak / stay-silent decision.

    It reads the hidden state of a micro-turn's last input position (which has heard this micro-turn's input and
    predicts its first output slot) and is trained with binary cross-entropy on ``floor_targets``: whether the
    reference speaks in at least half of the micro-turn's model audio positions, or starts speaking in it. At
    inference the decision is sampled from it (``cfg.floor``: ``sample``, or ``greedy`` = P > 0.5) and every output
    slot of the micro-turn follows it: silent writes ``<pad>`` text and silent audio; speaking draws the content
    given speech.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.dim + 1  # one linear unit

    @torch.no_grad()
    def init_weights(self) -> None:
        """After the model's normal(init_std) init: bias 0, so P(speak) starts at 1/2 up to the weights' small term."""
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy (nats) of each micro-turn's decision: hidden [Q, dim] at the queries of
        ``floor_targets``, target float [Q] (1 = the reference speaks) -> fp32 [Q]."""
        logits = self(h) if logits is None else logits
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-turn's decision for hidden states h [N, dim] -> (speak bool [N], P(speak) float [N]).

        Drawn from sigmoid(logit / ``cfg.floor_temperature``) (``cfg.floor``: sample, or greedy = P > 0.5); the
        returned P(speak) is the model's own (temperature 1). ``cfg.floor="none"`` has no micro-turn decision:
        speak is all True (every slot decides for itself)."""
        logit = self(h).float()
        p = torch.sigmoid(logit)
        if cfg.floor == "none":
            return torch.ones_like(p, dtype=torch.bool), p
        return decide_floor(torch.sigmoid(logit / cfg.floor_temperature), cfg.floor, generator), p


class ListenHead(nn.Module):
    """Hidden [N, dim] at the user's audio positions -> logits [N, vocab] of the transcript token due there (the
    ``heard_text`` label, ``tml.streams.modalities.audio``: each word's tokens from the position where it ends).

    A training signal only (``model.heads.listen``): nothing the model writes is sampled from it. It makes the
    backbone recognise the user's words where it hears them; without it the only gradient toward recognition comes
    through the model's own replies, and the tiny model took "just a moment, please" for "tell me something" and
    talked through wait windows (README, "Interaction: a model that takes turns").
    """

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.dim * cfg.vocab_size

    def init_weights(self) -> None:
        """Called after the model's normal(init_std) init of every linear layer: that init is this head's."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (nats) of each heard token: hidden [N, dim], target long [N] -> fp32 [N]."""
        logits = self(h) if logits is None else logits
        return F.cross_entropy(logits.float(), target, reduction="none")


def floor_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the floor decision is taken and what the reference did there.

    Returns (query bool [B, L], target float [Q]): ``query`` marks each micro-turn's last input position, the one
    followed by the micro-turn's first MODEL output slot; ``target`` (row-major over the queries) is 1 where the
    reference speaks in at least half of that micro-turn's model audio positions (``target_audio`` not all
    ``SILENT_BIN``), or starts speaking in it (some speech, none in the document's previous micro-turn). The second
    rule is for onsets: an utterance that starts late in a micro-turn has its first word in that micro-turn's text
    slots (45% of the reply onsets of the interaction held-out set), and a silent decision there would erase it. A
    trailing micro-turn with less than half speech stays silent, so a stop is not delayed by a micro-turn. A query
    whose micro-turn has no audio targets (cut by the end of its row) is dropped from ``query``. With
    ``layout.model_lead_turns`` the audio targets already carry the lead, so the target does too.
    """
    B, L = batch.shape
    query = torch.zeros(B, L, dtype=torch.bool, device=batch.kind.device)
    query[:, :-1] = ((batch.stream[:, :-1] != Stream.MODEL) & (batch.stream[:, 1:] == Stream.MODEL)
                     & (batch.doc_ids[:, :-1] == batch.doc_ids[:, 1:]) & (batch.doc_ids[:, :-1] >= 0))
    is_audio = batch.target_kind == Kind.AUDIO
    spoken = torch.zeros(B, L, device=batch.kind.device)
    spoken[is_audio] = (batch.target_audio != SILENT_BIN).flatten(1).any(1).float()
    # Each output position belongs to the query before it in its row: segment ids by a running count of queries.
    seg = query.long().cumsum(1) - 1 + torch.arange(B, device=query.device)[:, None] * L
    ok = is_audio & (seg >= torch.arange(B, device=query.device)[:, None] * L)
    n_audio = torch.zeros(B * L, device=spoken.device).index_add_(0, seg[ok], torch.ones_like(spoken[ok]))
    n_spoken = torch.zeros(B * L, device=spoken.device).index_add_(0, seg[ok], spoken[ok])
    query = query & (n_audio[seg.clamp_min(0)] > 0)  # a query's own segment starts at it, so its seg is >= 0
    q_seg = seg[query]
    some = n_spoken[q_seg] > 0  # [Q]
    # The previous query of the same row and document is the previous micro-turn (queries are row-major).
    qb, ql = query.nonzero(as_tuple=True)
    follows = torch.zeros_like(some)
    follows[1:] = (qb[1:] == qb[:-1]) & (batch.doc_ids[qb[1:], ql[1:]] == batch.doc_ids[qb[:-1], ql[:-1]])
    starts = some & ~(follows & torch.cat([some.new_zeros(1), some[:-1]]))
    return query, ((2 * n_spoken[q_seg] >= n_audio[q_seg]) | starts).float()


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


class FlowHead(nn.Module):
    """Flow-matching audio head (rectified flow / conditional flow matching, Lipman et al. 2022).

    Models the next audio position's ``frames x n_mels`` unit coordinates ``x1`` (see module docstring) given the
    backbone hidden state ``c``. Path ``x_t = (1 - t) * x0 + t * x1`` from noise ``x0 ~ N(0, I)``; the network
    regresses the velocity ``x1 - x0``. Sampling integrates ``dx/dt = v(x, t, c)`` from t = 0 to 1 with Euler or
    midpoint steps. During training the condition is replaced by a learned null vector with probability
    ``cond_dropout``, so sampling can use classifier-free guidance ``v_u + w * (v_c - v_u)``.
    """

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
    def from_config(cls, cfg: ModelConfig) -> FlowHead:
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


# The audio head of ``model.heads.audio`` (names: ``tml.model.config.AUDIO_HEADS``).
AUDIO_HEADS: dict[str, type[DMelHead] | type[FlowHead]] = {"dmel": DMelHead, "flow": FlowHead}
