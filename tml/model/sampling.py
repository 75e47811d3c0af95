"""How the model's outputs are drawn: the floor decision (speak or stay silent), then the content.

Every output head has ``sample(h, cfg, generator)`` (``tml.model.heads``); the streaming session and free generation
call only that, so every field below reaches every head:

    cfg = SamplingConfig()                                      # sampled floor decision, greedy content
    token = model.text_head.sample(h, cfg, gen, pad_id=0)       # long [N]
    unit = model.audio_head.sample(h, cfg, gen)                 # [N, frames, n_mels] unit coordinates
    bins = unit_to_bins(unit, model.cfg.dmel_bins)              # what the dMel bag reads back as the next input

Floor decisions. Whether to write or to stay silent is a hazard: in the gap before a reply each micro-turn has a
calibrated chance well below 0.5 of being the one where the reply starts, and ``<pad>`` competes with hundreds of
separate word tokens, so an argmax over tokens never starts a reply. With ``floor="sample"`` (the default) a head
first draws speak ~ Bernoulli(P(speak)) from the model's own probability (temperature 1: the hazard as trained),
then chooses the content given speech with the temperature / top-p fields (0 = greedy). The floor head's draw can
be sharpened (``floor_temperature``), and separately while the model is speaking (``floor_temperature_speaking``: the
decision to go on or to stop, given the session's previous decision), and that one's odds shifted
(``floor_threshold_speaking``). ``floor="greedy"`` speaks
iff P(speak) > 0.5 (the deterministic ablation), ``floor="none"`` draws each token / bin from the full
distribution as one class among all (the decoder before floor decisions; temperature 0 is the plain argmax).

Generators. Every draw takes ``generator``: one ``torch.Generator`` for all rows (row-major), or a list of them, one
per row of the first dimension (``Generators``): the batched streaming session's sessions, each drawing from its own
stream exactly the values it draws alone (a row draws what a batch of one draws: ``uniform``, ``normal`` and
``sample_logits`` consume each generator per row, in the same order and shapes either way). The work around the draws
(softmax, nucleus, floor rules) runs once for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# One generator for every row, or one per row of the first dimension (batched sessions); None = the global one.
Generators = torch.Generator | list[torch.Generator] | None

FLOOR_RULES = ("sample", "greedy", "none")
WORDS_GIVEN_SPEECH = ("never", "start", "always")


@dataclass
class SamplingConfig:
    floor: str = "sample"  # speak/silent decision: sample | greedy (P(speak) > 0.5) | none (no separate decision)
    # floor head only: the decision is drawn from sigmoid(logit(P(speak)) / floor_temperature); 1 = the model's own
    # probability, < 1 sharpens it towards its more likely side (0.5: P 0.1 -> 0.012, 0.9 -> 0.988)
    floor_temperature: float = 1.0
    # the same while the model spoke in its previous micro-turn (the decision to go on or to stop); None = as
    # floor_temperature. Starting and stopping are different hazards: a colder stop sharpens the drop in P(speak)
    # that a barge-in causes without delaying replies, which a colder start would (README, "Decoder")
    floor_temperature_speaking: Optional[float] = None
    # while speaking, the P(speak) at which going on and stopping are equally likely: the decision is drawn from
    # sigmoid((logit P(speak) - logit threshold) / temperature). 0.5 = the model's own odds; above it a drop in
    # P(speak) stops sooner (a barge-in's first 0.2-0.4 s leave P(speak) at 0.6-0.9 in a sixth of the barge-ins,
    # where a cough leaves it at ~1; README, "Decoder")
    floor_threshold_speaking: float = 0.5
    # which speaking micro-turns' text slots write a word with P(word | speak) = P(word) / P(speak) (a word implies
    # speech) instead of the text head's P(word): never | start (the micro-turn that starts a turn: a reply opens
    # with its first word, as every reference onset does; drawn from P(word), half the sampled starts wrote none, and
    # a model that hears itself speak without a word breaks off) | always (every one: it made earlier models write
    # more and talk through more wait windows, but not the 2026-12-03 recipe model). README, "Decoder"
    words_given_speech: str = "start"
    text_temperature: float = 0.0  # the word given speech (floor="none": the token); 0 = argmax
    text_top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    audio_temperature: float = 0.0  # dmel head, the bins given speech, per channel; 0 = argmax
    audio_top_p: float = 1.0
    flow_steps: int = 16  # flow head: ODE steps from noise (t = 0) to data (t = 1)
    flow_solver: str = "midpoint"  # euler | midpoint (2 head evaluations per step)
    guidance: float = 1.0  # flow head classifier-free guidance scale (1 = off; > 1 needs cond_dropout > 0)
    flow_temperature: float = 1.0  # flow head: scale of the starting noise (< 1: nearer the mode, less diverse)
    seed: int = 0

    def validate(self) -> "SamplingConfig":
        if self.words_given_speech not in WORDS_GIVEN_SPEECH:
            raise ValueError(f"sampling.words_given_speech={self.words_given_speech!r}: choose one of "
                             f"{', '.join(WORDS_GIVEN_SPEECH)} (start = a turn's first micro-turn, the default)")
        if self.floor not in FLOOR_RULES:
            raise ValueError(f"sampling.floor={self.floor!r}: choose one of {', '.join(FLOOR_RULES)} (sample = draw "
                             f"the speak/silent decision, the default)")
        for key in ("text_temperature", "audio_temperature"):
            if getattr(self, key) < 0:
                raise ValueError(f"sampling.{key}={getattr(self, key)}: must be >= 0 (0 = argmax)")
        for key in ("text_top_p", "audio_top_p"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"sampling.{key}={getattr(self, key)}: must be in (0, 1]")
        if self.flow_steps < 1 or self.flow_solver not in ("euler", "midpoint"):
            raise ValueError(f"sampling.flow_steps={self.flow_steps} must be >= 1 and sampling.flow_solver="
                             f"{self.flow_solver!r} one of euler, midpoint")
        for key in ("floor_temperature", "floor_temperature_speaking"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"sampling.{key}={value}: must be > 0 (1 = the model's own probability; greedy is "
                                 f"sampling.floor=greedy)")
        if not 0 < self.floor_threshold_speaking < 1:
            raise ValueError(f"sampling.floor_threshold_speaking={self.floor_threshold_speaking}: must be in (0, 1) "
                             f"(0.5 = the model's own odds)")
        if self.flow_temperature < 0:
            raise ValueError(f"sampling.flow_temperature={self.flow_temperature}: must be >= 0")
        if self.guidance < 0:
            raise ValueError(f"sampling.guidance={self.guidance}: must be >= 0 (1 = no guidance)")
        return self


def _rows_of(generator: list[torch.Generator], n: int, what: str) -> int:
    """How many of n rows each generator of the list owns (an equal share each, in order)."""
    if not generator or n % len(generator):
        raise ValueError(f"{what}: {n} rows cannot be split among {len(generator)} generators (one per row of the "
                         f"first dimension)")
    return n // len(generator)


def _draw(draw, what: str, shape: tuple[int, ...], generator: Generators, device) -> torch.Tensor:
    """``draw`` (``torch.rand`` / ``torch.randn``) of ``shape``: row-major from one generator, or row ``i`` of the
    first dimension from ``generator[i]`` (its values are those a batch of one draws from it)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{what}: {len(generator)} generators for {shape[0]} rows")
        return torch.stack([draw(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    return draw(shape, generator=generator, device=generator.device if generator is not None else None).to(device)


def uniform(shape: tuple[int, ...], generator: Generators = None, device=None) -> torch.Tensor:
    """float32 uniforms in [0, 1) of ``shape`` (on ``device``), per row from its generator when given a list."""
    return _draw(torch.rand, "uniform", shape, generator, device)


def normal(shape: tuple[int, ...], generator: Generators = None, device=None) -> torch.Tensor:
    """float32 standard normals of ``shape``, per row from its generator as ``uniform``."""
    return _draw(torch.randn, "normal", shape, generator, device)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  generator: Generators = None) -> torch.Tensor:
    """Draw one class per row of logits [N, ..., K] -> long [N, ...].

    temperature 0 is argmax; otherwise softmax(logits / temperature) restricted to the nucleus: the classes in
    descending probability up to and including the first at which the cumulative probability reaches ``top_p``.
    Logits of -inf are classes that cannot be drawn. The draw happens on the generator's device; with a list of
    generators (one per row of the first dimension) each row's classes are drawn from its own.
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
    if isinstance(generator, list):  # each generator draws its rows' classes, as for a batch of one
        n = _rows_of(generator, probs.shape[0], "sample_logits")
        draw = torch.cat([torch.multinomial(p.to(g.device), 1, generator=g).to(probs.device)
                          for p, g in zip(probs.split(n), generator)])
    else:
        device = generator.device if generator is not None else probs.device
        draw = torch.multinomial(probs.to(device), 1, generator=generator)
    return draw.view(shape).to(logits.device)


def decide_floor(p_speak: torch.Tensor, rule: str, generator: Generators = None) -> torch.Tensor:
    """The speak/stay-silent decision from P(speak) [N] -> bool [N].

    ``sample``: True with probability P(speak), one uniform draw per row (always drawn, whatever the outcome, so a
    seeded run consumes the generator identically whatever the model says); ``greedy``: P(speak) > 0.5.
    """
    if rule == "sample":
        return uniform(p_speak.shape, generator, p_speak.device) < p_speak
    if rule == "greedy":
        return p_speak > 0.5
    raise ValueError(f"sampling.floor={rule!r} has no speak/silent decision; choose sample or greedy")
