"""Model configuration: one frozen dataclass and the three presets.

Every dimension of the network lives here, so that a preset name (or a ``ModelConfig``) fully
determines the architecture, and every federated party that builds the same preset with the same
``base_seed`` gets bit-identical frozen T5 base weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from data_partition.constants import MODALITIES  # the single source of truth for the modality order

ACC_MODALITIES = ("act", "acw")
FRAME_MODALITIES = ("dc", "pm")
FRAME_SHAPES = {"dc": (12, 16), "pm": (32, 16)}
ACC_CHANNELS = 3
NUM_CLASSES = 7


@dataclass(frozen=True)
class ModelConfig:
    """All dimensions of Time-MAGNET and its baselines.

    Input rates (``acc_hz``, ``frame_hz``, ``window_s``) travel with the preset so the data side
    (``data_partition.PreprocessConfig``) can be configured from it.
    """

    name: str = "custom"
    # --- training ----------------------------------------------------------------------------------
    lr: float = 1e-4  # the preset's learning rate (run-config `lr = 0`): the paper's 1e-4 for its full-size model
    # --- input rates ---------------------------------------------------------------------------
    acc_hz: float = 100.0
    frame_hz: float = 15.0
    window_s: float = 5.0
    # --- shared ----------------------------------------------------------------------------------
    d_emb: int = 512  # every encoder outputs this size; fusion works at this size
    base_seed: int = 0  # seeds the frozen T5 base weights (identical on every party)
    # "batch" = BatchNorm, as in the paper. "layer" = per-sample GroupNorm(1)/LayerNorm, no batch statistics.
    # Federated clients hold one subject each, which BatchNorm handles badly; "layer" was measured worse on
    # the compact federated protocol all the same (docs/federated.md), so every preset keeps "batch".
    norm: str = "batch"
    # --- time-series encoder (act, acw): per-timestep projection + sinusoidal PE + T5 + LoRA ----
    ts_proj_hidden: int = 256  # 0 = a single Linear(C -> d_model)
    t5_d_model: int = 512
    t5_layers: int = 8
    t5_heads: int = 8
    t5_d_kv: int = 64
    t5_d_ff: int = 2048
    t5_ff_proj: str = "gated-gelu"
    t5_dropout: float = 0.1  # T5-internal dropout_rate (0 on CPU: the slow SDPA path otherwise)
    t5_rel_buckets: int = 32
    t5_rel_max_distance: int = 128
    t5_eps: float = 1e-6
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    ts_dropout: float = 0.1  # dropout outside T5 (projection and pooling head)
    # per-channel mean / std / min / max of the (globally normalised) window, concatenated to the pooled T5
    # output: the posture signal that a random-feature forest reads off the accelerometers (docs/model.md)
    ts_window_stats: bool = False
    # BatchNorm over those statistics: a client holds one subject, and evaluation re-estimates BatchNorm
    # statistics per subject (AdaBN), so each subject's statistics are standardised by that subject's own
    # (sensor placement and posture offsets differ between subjects; docs/model.md)
    ts_window_stats_norm: bool = False
    # what the latent generators (FedMobile-style) are distilled towards: "embedding" = the real embedding (MSE on
    # standardised embeddings; gate: reconstruction R² on held-out subjects); "prediction" = also the model's own
    # prediction with the real embedding, through the frozen fusion and classifier (KL; gate: the generated node
    # lowers the held-out cross-entropy). model/generators.py, docs/experiments/2026-11-22-strategies-log.md
    generator_objective: str = "embedding"
    # --- DART-CNN (dc, pm) -----------------------------------------------------------------------
    cnn_channels: tuple[int, ...] = (64, 128, 256, 512)
    cnn_pool_after: int = 2  # max-pool 2x2 after this many conv blocks (0 = never)
    cnn_attn_reduction: int = 16
    dc_pool: tuple[int, int] = (1, 1)  # avg-pool (kh, kw) of each dc frame before the CNN
    pm_pool: tuple[int, int] = (1, 1)  # same for pm (compact: 32x16 -> 16x8)
    cnn_dropout: float = 0.3
    rnn_hidden: int = 256  # per direction
    lstm_layers: int = 3
    birnn_layers: int = 2
    gru_layers: int = 1
    rnn_dropout: float = 0.1
    # --- MAGNET fusion ---------------------------------------------------------------------------
    gat_heads: int = 8
    fusion_layers: int = 3  # Fusion Layer II blocks (after one Fusion Layer I GAT)
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 2048
    swiglu_hidden: int = 1365
    gate_noise: float = 0.1
    fusion_dropout: float = 0.1
    # --- classifier ------------------------------------------------------------------------------
    cls_hidden: tuple[int, ...] = (512, 256, 128)
    cls_dropout: tuple[float, ...] = (0.4, 0.3, 0.2)
    # --- baselines -------------------------------------------------------------------------------
    lstm_baseline_hidden: int = 128
    lstm_baseline_layers: int = 2

    # derived -------------------------------------------------------------------------------------
    @property
    def acc_steps(self) -> int:
        return int(round(self.window_s * self.acc_hz))

    @property
    def frame_steps(self) -> int:
        return int(round(self.window_s * self.frame_hz))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("cnn_channels", "cls_hidden", "cls_dropout", "dc_pool", "pm_pool"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


PAPER = ModelConfig(name="paper")

# CPU preset, sized by measurement (bench/model.py, docs/model.md): whole model fwd+bwd+AdamW at
# batch 8 single-threaded within the ~4-5 ms/sample budget of the federated protocol.
COMPACT = ModelConfig(
    name="compact",
    lr=1e-3,  # trained from scratch, 40x fewer parameters: 1e-4 learns too slowly in 10 rounds (docs/model.md)
    acc_hz=5.0,
    frame_hz=2.0,
    d_emb=64,
    ts_proj_hidden=0,
    t5_d_model=64,
    t5_layers=2,
    t5_heads=4,
    t5_d_kv=16,
    t5_d_ff=128,
    t5_dropout=0.0,
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    ts_dropout=0.1,
    cnn_channels=(8, 16),
    cnn_pool_after=1,
    cnn_attn_reduction=4,
    pm_pool=(2, 2),
    cnn_dropout=0.2,
    rnn_hidden=32,
    lstm_layers=1,
    birnn_layers=1,
    gru_layers=1,
    rnn_dropout=0.0,
    gat_heads=4,
    fusion_layers=1,
    n_experts=4,
    top_k=2,
    expert_hidden=64,
    swiglu_hidden=170,
    fusion_dropout=0.1,
    cls_hidden=(64, 32, 16),
    cls_dropout=(0.3, 0.2, 0.1),
    lstm_baseline_hidden=64,
    lstm_baseline_layers=1,
)

# Tests only: seconds to build and run.
TINY = ModelConfig(
    name="tiny",
    lr=3e-3,
    acc_hz=4.0,
    frame_hz=2.0,
    window_s=5.0,
    d_emb=16,
    ts_proj_hidden=0,
    t5_d_model=16,
    t5_layers=1,
    t5_heads=2,
    t5_d_kv=8,
    t5_d_ff=32,
    t5_dropout=0.0,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    ts_dropout=0.0,
    cnn_channels=(4, 8, 8, 8),
    cnn_attn_reduction=2,
    pm_pool=(2, 2),
    cnn_dropout=0.0,
    rnn_hidden=8,
    lstm_layers=1,
    birnn_layers=1,
    gru_layers=1,
    rnn_dropout=0.0,
    gat_heads=2,
    fusion_layers=1,
    n_experts=4,
    top_k=2,
    expert_hidden=16,
    swiglu_hidden=24,
    fusion_dropout=0.0,
    cls_hidden=(16, 8),
    cls_dropout=(0.0, 0.0),
    lstm_baseline_hidden=8,
    lstm_baseline_layers=1,
)

PRESETS: dict[str, ModelConfig] = {"paper": PAPER, "compact": COMPACT, "tiny": TINY}


def get_config(preset: "str | ModelConfig", **overrides) -> ModelConfig:
    """A preset by name (or a config passed through), with optional field overrides."""
    if isinstance(preset, ModelConfig):
        cfg = preset
    else:
        try:
            cfg = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
