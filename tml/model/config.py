"""Model configuration: plain dataclasses with typed defaults, so Hydra can compose them as structured configs.

Only ``validate()`` knows the rules; modules assume a validated config. Every error names the config key
(``model.<field>`` / ``model.moe.<field>``) and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tml.errors import ConfigError

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_BACKENDS = ("grouped_mm", "megablocks")


@dataclass
class MoEConfig:
    """Token-choice top-k mixture of SwiGLU experts. The expert input/output width is ``ModelConfig.dim``."""

    hidden_dim: int = 128  # per-expert SwiGLU hidden width
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0  # always-on SwiGLU of width num_shared_experts * hidden_dim (0 = none)
    score_func: str = "softmax"  # softmax | sigmoid
    route_norm: bool = False  # renormalise the top-k scores to sum to 1 per token (Mixtral / DeepSeek-V3)
    route_scale: float = 1.0  # multiplies the routing weights (DeepSeek-V3's routed_scaling_factor)
    aux_loss_coeff: float = 0.01  # switch-style load-balancing loss weight (0 disables)
    z_loss_coeff: float = 0.0  # router z-loss weight (ST-MoE), keeps router logits small (0 disables)
    seq_aux_loss_coeff: float = 0.0  # sequence-level balance loss weight (DeepSeek-V3: balance within each row)
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the scores for top-k selection only,
    # moved by this step size after every optimizer step toward uniform load (0 disables).
    load_balance_coeff: float = 0.0
    # Group-limited routing (DeepSeek-V3): experts split into n_groups; each token picks its topk_groups best groups
    # (group score: sum of its top-2 scores) and chooses its top_k experts inside them. 1 = off.
    n_groups: int = 1
    topk_groups: int = 1
    # Token dropping for comparison runs: each expert takes at most ceil(capacity_factor * tokens * top_k / E)
    # assignments (first come, first served in token order); the rest are dropped. 0 = dropless.
    capacity_factor: float = 0.0
    expert_backend: str = "grouped_mm"  # grouped_mm (CPU and GPU) | megablocks (GPU; make setup-gpu)


@dataclass
class FlowHeadConfig:
    """The flow-matching audio head (``model.heads.audio=flow``): an AdaLN residual MLP over the stacked
    ``frames x n_mels`` values of one audio position, conditioned on the backbone hidden state and the flow time."""

    hidden_dim: int = 256
    n_layers: int = 3  # residual AdaLN MLP blocks
    cond_dropout: float = 0.1  # training: replace the condition by a learned null vector (classifier-free guidance)
    train_repeats: int = 4  # noise draws per target position per step (the head is cheap next to the backbone)


# The output heads (``tml/model/heads/``), one entry per head, in the order the model builds them (its module
# ``<name>_head``, checkpoint keys ``<name>_head.*``): each value ``model.heads.<name>`` may take -> the class that
# implements it as "module:Class" (None: no such head). Import paths, not classes, so validating a config needs
# neither torch nor the heads (which import this module); ``tml.model.heads.head_classes`` resolves them.
HEADS: dict[str, dict] = {
    "text": {"untied": "tml.model.heads.text:TextHead", "tied": "tml.model.heads.text:TextHead"},
    "audio": {"dmel": "tml.model.heads.dmel:DMelHead", "flow": "tml.model.heads.flow:FlowHead"},
    "floor": {True: "tml.model.heads.floor:FloorHead", False: None},
    "listen": {True: "tml.model.heads.listen:ListenHead", False: None},
}


@dataclass
class HeadsConfig:
    """Output heads: one switch per entry of ``HEADS``, plus a head's own settings (``flow``). ``audio``: ``dmel``
    (per-channel ``dmel_bins``-way classification, exact likelihood) or ``flow`` (flow matching over continuous
    log-mel); ``text``: ``untied`` or ``tied`` to the text embedding; ``floor``: a ``FloorHead`` that decides speak /
    stay silent once per micro-turn (``tml.model.heads``). Runs saved before it existed load with ``floor: false``
    and decide per output slot from the content heads. ``listen``: a ``ListenHead`` trained on the user's transcript
    where it is heard (``Batch.heard_text``), a training signal for recognising the user's words; nothing samples
    it."""

    audio: str = "dmel"
    text: str = "untied"
    floor: bool = True
    listen: bool = False
    flow: FlowHeadConfig = field(default_factory=FlowHeadConfig)


@dataclass
class ModelConfig:
    """The interaction model: multimodal embedding -> n_layers pre-norm blocks -> text and dMel heads.

    The first ``dense_layers`` blocks use a dense SwiGLU of width ``dense_hidden_dim``; the rest use the MoE.
    """

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads (plain multi-head)
    vocab_size: int = 512  # set at run time from the tokenizer
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_positions: int = 8192  # longest packed row the model accepts (RoPE has no table; this is a guard)
    dense_layers: int = 0
    dense_hidden_dim: int = 256  # default = top_k * moe.hidden_dim: same active FLOPs as an MoE layer
    moe: MoEConfig = field(default_factory=MoEConfig)
    # modality front ends and heads; must agree with the data layout (tml.streams.layout.LayoutConfig)
    n_mels: int = 80
    frames_per_audio_position: int = 4
    dmel_bins: int = 16
    patch_size: int = 40
    max_patch_grid: int = 16  # rows/cols of the learned patch position tables (frames up to 16*40 = 640 px)
    init_std: float = 0.02
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    # Recompute each block's activations in backward instead of storing them (training only): per-layer
    # activation memory drops to the block input, for ~1/3 more compute. See tml.tools.plan for the numbers.
    activation_checkpointing: bool = False

    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the offending key; return self so calls can chain."""
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_positions", "n_mels",
                    "frames_per_audio_position", "dmel_bins", "patch_size", "max_patch_grid"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)}: must be positive")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                              f"pick n_heads among the divisors of dim")
        if self.num_kv_heads <= 0 or self.n_heads % self.num_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                              f"{self.n_kv_heads}; each key/value head must serve a whole group of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"head dim model.dim/model.n_heads={self.head_dim} is odd; RoPE rotates pairs of "
                              f"channels, so pick dim and n_heads with an even quotient")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.rope_theta, model.norm_eps and model.init_std must be positive")
        if not 0 <= self.dense_layers <= self.n_layers:
            raise ConfigError(f"model.dense_layers={self.dense_layers}: must be in [0, model.n_layers="
                              f"{self.n_layers}]")
        if self.dense_layers > 0 and self.dense_hidden_dim <= 0:
            raise ConfigError(f"model.dense_hidden_dim={self.dense_hidden_dim}: must be positive when "
                              f"model.dense_layers={self.dense_layers} > 0")
        if self.patch_size % 4:
            raise ConfigError(f"model.patch_size={self.patch_size}: the hMLP stem is conv k(P/4) -> k2 -> k2, so "
                              f"the patch size must be a multiple of 4 (e.g. 16 or 40)")
        self._validate_moe()
        self._validate_heads()
        return self

    def _validate_heads(self) -> None:
        h, f = self.heads, self.heads.flow
        for name, choices in HEADS.items():
            value = getattr(h, name)
            if value not in choices or type(value) is not type(next(iter(choices))):  # 1 would equal True
                raise ConfigError(f"model.heads.{name}={value!r}: choose one of "
                                  f"{', '.join(str(c).lower() if isinstance(c, bool) else c for c in choices)}")
        if f.hidden_dim <= 0 or f.n_layers <= 0 or f.train_repeats <= 0:
            raise ConfigError(f"model.heads.flow.hidden_dim={f.hidden_dim}, n_layers={f.n_layers} and "
                              f"train_repeats={f.train_repeats} must be positive")
        if not 0.0 <= f.cond_dropout < 1.0:
            raise ConfigError(f"model.heads.flow.cond_dropout={f.cond_dropout}: must be in [0, 1) (0 disables "
                              f"classifier-free guidance)")

    def _validate_moe(self) -> None:
        m = self.moe
        if m.num_experts <= 0 or m.hidden_dim <= 0:
            raise ConfigError(f"model.moe.num_experts={m.num_experts} and model.moe.hidden_dim={m.hidden_dim} "
                              f"must be positive")
        if m.top_k < 1:
            raise ConfigError(f"model.moe.top_k={m.top_k}: must be >= 1")
        if m.top_k > m.num_experts:
            raise ConfigError(f"model.moe.top_k={m.top_k} > model.moe.num_experts={m.num_experts}: each token "
                              f"picks top_k distinct experts; use 1 <= top_k <= num_experts")
        if m.top_k == 1 and m.route_norm:
            raise ConfigError("model.moe.route_norm=true with model.moe.top_k=1 makes every routing weight 1, so the "
                              "router gets no gradient from the loss (only from the aux loss); set "
                              "model.moe.route_norm=false (Switch Transformer) or top_k >= 2")
        if m.num_shared_experts < 0:
            raise ConfigError(f"model.moe.num_shared_experts={m.num_shared_experts}: must be >= 0")
        if m.score_func not in SCORE_FUNCS:
            raise ConfigError(f"model.moe.score_func={m.score_func!r}: choose one of {', '.join(SCORE_FUNCS)}")
        if m.route_scale <= 0:
            raise ConfigError(f"model.moe.route_scale={m.route_scale}: must be positive")
        for key in ("aux_loss_coeff", "z_loss_coeff", "seq_aux_loss_coeff", "load_balance_coeff", "capacity_factor"):
            if getattr(m, key) < 0:
                raise ConfigError(f"model.moe.{key}={getattr(m, key)}: must be >= 0")
        if m.n_groups < 1 or m.num_experts % m.n_groups:
            raise ConfigError(f"model.moe.n_groups={m.n_groups} must be >= 1 and divide model.moe.num_experts="
                              f"{m.num_experts}")
        if not 1 <= m.topk_groups <= m.n_groups:
            raise ConfigError(f"model.moe.topk_groups={m.topk_groups}: must be in [1, model.moe.n_groups={m.n_groups}]")
        if m.top_k > m.topk_groups * (m.num_experts // m.n_groups):
            raise ConfigError(f"model.moe.top_k={m.top_k} exceeds the experts in model.moe.topk_groups={m.topk_groups}"
                              f" groups of {m.num_experts // m.n_groups}; raise topk_groups or lower top_k")
        if m.expert_backend not in EXPERT_BACKENDS:
            raise ConfigError(f"model.moe.expert_backend={m.expert_backend!r}: choose one of "
                              f"{', '.join(EXPERT_BACKENDS)}")
        if self.n_moe_layers > 0:
            # grouped_mm needs every operand row stride to be a multiple of 16 bytes (CPU and CUDA kernels).
            for key, size in (("model.dim", self.dim), ("model.moe.hidden_dim", m.hidden_dim)):
                if size % 4:
                    raise ConfigError(
                        f"{key}={size}: torch grouped_mm (the expert matmul) needs row strides that are multiples "
                        f"of 16 bytes, i.e. a multiple of 4 for fp32 weights (8 for bf16/fp16); use "
                        f"{key}={-(-size // 8) * 8}")
