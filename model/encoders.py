"""Per-modality encoders: T5+LoRA time-series encoder, DART-CNN frame encoder, LSTM baseline encoder."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODALITIES, ModelConfig


def base_seed_for(cfg: ModelConfig, modality: str) -> int:
    """Seed of the frozen base weights of one modality's encoder (same on every party)."""
    return int(cfg.base_seed) * 1000 + 17 * (MODALITIES.index(modality) + 1)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of Vaswani et al., [length, dim]."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


def build_frozen_t5(cfg: ModelConfig, seed: int) -> nn.Module:
    """A randomly initialised T5 encoder whose weights depend only on ``cfg`` and ``seed``.

    The global RNG state is forked, so neither the caller's seed nor anything built before changes
    these weights, and building them does not consume the caller's random stream.
    """
    from transformers import T5Config, T5EncoderModel

    t5cfg = T5Config(
        vocab_size=2,  # never used (inputs_embeds); tiny so there is no dead 16M-parameter table
        d_model=cfg.t5_d_model,
        d_kv=cfg.t5_d_kv,
        d_ff=cfg.t5_d_ff,
        num_layers=cfg.t5_layers,
        num_heads=cfg.t5_heads,
        relative_attention_num_buckets=cfg.t5_rel_buckets,
        relative_attention_max_distance=cfg.t5_rel_max_distance,
        dropout_rate=cfg.t5_dropout,
        layer_norm_epsilon=cfg.t5_eps,
        feed_forward_proj=cfg.t5_ff_proj,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    if t5cfg.dense_act_fn == "gelu_new":  # the same tanh-approximated GELU (|diff| < 1e-6) in one fused kernel
        t5cfg.dense_act_fn = "gelu_pytorch_tanh"  # instead of six elementwise ops (docs/performance.md)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(t5cfg)
    for p in t5.parameters():
        p.requires_grad_(False)
    return t5


class TimeSeriesEncoder(nn.Module):
    """Accelerometer encoder: per-timestep token projection, sinusoidal PE, frozen T5 + LoRA, pooling.

    Input ``[B, T, C]``; each timestep's C-channel vector is one token (channel-dependent patching
    with patch length 1). Output ``[B, d_emb]``.
    """

    def __init__(self, cfg: ModelConfig, modality: str, in_channels: int = 3):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        d = cfg.t5_d_model
        if cfg.ts_proj_hidden > 0:
            self.proj = nn.Sequential(
                nn.Linear(in_channels, cfg.ts_proj_hidden),
                nn.GELU(),
                nn.Dropout(cfg.ts_dropout),
                nn.Linear(cfg.ts_proj_hidden, d),
            )
        else:
            self.proj = nn.Linear(in_channels, d)
        self.in_dropout = nn.Dropout(cfg.ts_dropout)
        self._pe_cache: torch.Tensor | None = None
        t5 = build_frozen_t5(cfg, base_seed_for(cfg, modality))
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=["q", "k", "v"],
            bias="none",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.t5 = get_peft_model(t5, lora)
        self.window_stats = cfg.ts_window_stats
        if cfg.ts_window_stats_norm and not cfg.ts_window_stats:
            raise ValueError("ts_window_stats_norm normalises the window statistics: it needs ts_window_stats")
        self.stats_norm = nn.BatchNorm1d(4 * in_channels) if cfg.ts_window_stats_norm else None
        d_pooled = 2 * d + (4 * in_channels if self.window_stats else 0)
        self.head = nn.Sequential(nn.Linear(d_pooled, cfg.d_emb), nn.GELU(), nn.Dropout(cfg.ts_dropout))

    def _positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        pe = self._pe_cache
        if pe is None or pe.shape[0] < length or pe.device != like.device:
            pe = sinusoidal_positions(max(length, 512), like.shape[-1]).to(like.device)
            self._pe_cache = pe
        return pe[:length].to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = self.in_dropout(h + self._positions(h.shape[1], h))
        h = self.t5(inputs_embeds=h).last_hidden_state
        pooled = [h.mean(dim=1), h.amax(dim=1)]
        if self.window_stats:
            stats = torch.cat([x.mean(dim=1), x.std(dim=1, unbiased=False), x.amin(dim=1), x.amax(dim=1)], dim=-1)
            pooled.append(stats if self.stats_norm is None else self._normalise_stats(stats))
        return self.head(torch.cat(pooled, dim=-1))

    def _normalise_stats(self, stats: torch.Tensor) -> torch.Tensor:
        bn = self.stats_norm
        if bn.training and stats.shape[0] < 2:  # one window with this sensor in the batch: no batch statistics
            return F.batch_norm(stats, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        return bn(stats)


def norm_layer(kind: str, features: int, *, spatial: bool = False, groups: int = 1) -> nn.Module:
    """The model's one normalisation switch (ModelConfig.norm): BatchNorm over the batch, or a per-sample
    GroupNorm over `groups` groups of the features (groups=1 = LayerNorm over channels and positions)."""
    if kind == "batch":
        return nn.BatchNorm2d(features) if spatial else nn.BatchNorm1d(features)
    if kind == "layer":
        return nn.GroupNorm(groups, features)
    raise ValueError(f"unknown norm {kind!r}: 'batch' or 'layer'")


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str = "batch"):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            norm_layer(norm, cout, spatial=True),
            nn.ReLU(inplace=True),
        )


class SpatialChannelAttention(nn.Module):
    """CBAM-style attention: a spatial map (1x1 conv, sigmoid) and channel gates (GAP, MLP with
    reduction r, sigmoid), computed in parallel and both multiplied in."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.spatial = nn.Conv2d(channels, 1, 1)
        self.channel = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sa = torch.sigmoid(self.spatial(x))
        ca = torch.sigmoid(self.channel(x.mean(dim=(2, 3))))[:, :, None, None]
        return x * sa * ca


def _birnn(kind: type[nn.RNNBase], din: int, hidden: int, layers: int, dropout: float, **kw):
    return kind(
        din,
        hidden,
        num_layers=layers,
        batch_first=True,
        bidirectional=True,
        dropout=dropout if layers > 1 else 0.0,
        **kw,
    )


class DartCNN(nn.Module):
    """DART-CNN frame encoder: per-frame conv blocks + spatial/channel attention + GAP + FFNN,
    then BiLSTM -> BiRNN -> BiGRU over time, a residual from the frame embeddings, temporal mean.

    Input ``[B, T, H, W]``; output ``[B, d_emb]``.
    """

    def __init__(self, cfg: ModelConfig, modality: str):
        super().__init__()
        pool = tuple(getattr(cfg, f"{modality}_pool", (1, 1)))
        self.pre_pool = nn.AvgPool2d(pool) if pool != (1, 1) else nn.Identity()
        layers: list[nn.Module] = []
        cin = 1
        for i, c in enumerate(cfg.cnn_channels):
            layers.append(ConvBlock(cin, c, cfg.norm))
            if cfg.cnn_pool_after and i + 1 == cfg.cnn_pool_after:
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.cnn = nn.Sequential(*layers)
        self.attn = SpatialChannelAttention(cin, cfg.cnn_attn_reduction)
        self.cnn.to(memory_format=torch.channels_last)
        self.attn.to(memory_format=torch.channels_last)
        self.ffn = nn.Sequential(
            nn.Linear(cin, cfg.d_emb), nn.GELU(), nn.Dropout(cfg.cnn_dropout), nn.Linear(cfg.d_emb, cfg.d_emb)
        )
        h = cfg.rnn_hidden
        rnns: list[nn.Module] = []
        din = cfg.d_emb
        if cfg.lstm_layers:
            rnns.append(_birnn(nn.LSTM, din, h, cfg.lstm_layers, cfg.rnn_dropout))
            din = 2 * h
        if cfg.birnn_layers:
            rnns.append(_birnn(nn.RNN, din, h, cfg.birnn_layers, cfg.rnn_dropout, nonlinearity="tanh"))
            din = 2 * h
        if cfg.gru_layers:
            rnns.append(_birnn(nn.GRU, din, h, cfg.gru_layers, cfg.rnn_dropout))
            din = 2 * h
        self.rnns = nn.ModuleList(rnns)
        self.out_proj = nn.Linear(din, cfg.d_emb) if din != cfg.d_emb else nn.Identity()

    def frame_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        b, t, hh, ww = x.shape
        f = self.pre_pool(x.reshape(b * t, 1, hh, ww))
        # channels-last: oneDNN conv / BatchNorm / max-pool kernels are several times faster on
        # many small frames than the NCHW ones (per-plane overhead)
        f = f.contiguous(memory_format=torch.channels_last)
        f = self.attn(self.cnn(f))
        f = self.ffn(f.mean(dim=(2, 3)))
        return f.reshape(b, t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.frame_embeddings(x)
        h = e
        for rnn in self.rnns:
            h, _ = rnn(h)
        return (e + self.out_proj(h)).mean(dim=1)


class LSTMEncoder(nn.Module):
    """Baseline encoder: per-timestep linear projection of the raw (flattened) inputs, a
    unidirectional LSTM, the last hidden state -> d_emb. Works for accelerometers and frames."""

    def __init__(self, cfg: ModelConfig, in_features: int, pool: Sequence[int] = (1, 1)):
        super().__init__()
        self.pool = tuple(pool)
        h = cfg.lstm_baseline_hidden
        self.proj = nn.Linear(in_features, h)
        self.lstm = nn.LSTM(h, h, num_layers=cfg.lstm_baseline_layers, batch_first=True)
        self.head = nn.Sequential(nn.Linear(h, cfg.d_emb), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # frames [B, T, H, W]
            b, t, hh, ww = x.shape
            if self.pool != (1, 1):
                x = F.avg_pool2d(x.reshape(b * t, 1, hh, ww), self.pool).reshape(b, t, -1)
            else:
                x = x.reshape(b, t, hh * ww)
        _, (hn, _) = self.lstm(torch.relu(self.proj(x)))
        return self.head(hn[-1])
