"""Fusion modules. Each takes modality embeddings ``E [B, M, d]`` and a presence mask ``[B, M]``
(True = present) and returns ``(features [B, d_out], aux_loss scalar)``.

- ``MAGNET``: graph attention over modality nodes with a similarity-gated adjacency, sparse MoE,
  SwiGLU, attention pooling (Time-MAGNET's fusion).
- ``ConcatFusion`` / ``AttentionFusion``: the paper's simple fusion baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .encoders import norm_layer


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros((), dtype=torch.float32)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` with ``mask`` False entries excluded; rows with no True entry fall
    back to a softmax over all entries (never NaN)."""
    has_any = mask.any(dim=dim, keepdim=True)
    mask = mask | ~has_any
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)


class GraphAttention(nn.Module):
    """Multi-head graph attention over modality nodes, weighted by a soft adjacency.

    Per head: ``e_ij = LeakyReLU(a_src·Wh_i + a_dst·Wh_j)``, softmax over the allowed neighbours j,
    multiplied by ``A_ij`` and renormalised; per-head LayerNorm; heads concatenated and projected.
    """

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} not divisible by heads={heads}")
        self.h, self.dh = heads, d // heads
        self.w = nn.Linear(d, d)
        self.a_src = nn.Parameter(torch.empty(heads, self.dh))
        self.a_dst = nn.Parameter(torch.empty(heads, self.dh))
        nn.init.xavier_uniform_(self.a_src)
        nn.init.xavier_uniform_(self.a_dst)
        self.head_norm = nn.LayerNorm(self.dh)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, m, _ = x.shape
        wh = self.w(x).view(b, m, self.h, self.dh)  # [B, M, H, dh]
        s = (wh * self.a_src).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, M, 1]
        t = (wh * self.a_dst).sum(-1).transpose(1, 2).unsqueeze(-2)  # [B, H, 1, M]
        e = F.leaky_relu(s + t, 0.2)
        att = masked_softmax(e, allowed.unsqueeze(1))
        att = att * adj.unsqueeze(1)
        att = att / att.sum(-1, keepdim=True).clamp_min(1e-9)
        att = self.drop(att)
        out = att @ wh.transpose(1, 2)  # [B, H, M, dh]
        out = self.head_norm(out).transpose(1, 2).reshape(b, m, self.h * self.dh)
        return self.drop(self.out(out))


class Expert(nn.Module):
    """MoE expert with an internal skip connection: h1 = RMSNorm(GELU(W1 x)),
    h2 = Dropout(RMSNorm(GELU(W2 h1))), out = W3(h1 + h2). No biases."""

    def __init__(self, d: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, hidden, bias=False)
        self.w3 = nn.Linear(hidden, d, bias=False)
        self.n1 = nn.RMSNorm(hidden, eps=eps)
        self.n2 = nn.RMSNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.n1(F.gelu(self.w1(x)))
        h2 = self.drop(self.n2(F.gelu(self.w2(h1))))
        return self.w3(h1 + h2)


class SparseMoE(nn.Module):
    """Top-k routed mixture of experts over tokens ``[N, d]``.

    Noisy gate (training only), softmax over the k chosen logits, and sparse compute: each expert
    runs only on the tokens routed to it (gather, then ``index_add_`` back). The auxiliary loss is
    the entropy-based load-balancing term ``ln(E) - H(mean_tokens softmax(logits))`` (>= 0, 0 when
    the average routing distribution is uniform); the training loop scales it by lambda.
    """

    def __init__(self, d: int, hidden: int, n_experts: int, top_k: int, noise: float, dropout: float, eps: float):
        super().__init__()
        self.n_experts, self.top_k, self.noise = n_experts, min(top_k, n_experts), noise
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, hidden, dropout, eps) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == 0:
            return x, _zero(x)
        logits = self.gate(x)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        probs = torch.softmax(logits.float(), dim=-1)
        u = probs.mean(dim=0)
        aux = math.log(self.n_experts) + (u * torch.log(u.clamp_min(1e-9))).sum()
        top_v, top_i = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top_v, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(x[tok]) * weights[tok, slot].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, tok, y.to(out.dtype))
        return out, aux


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.drop(F.silu(self.w1(x)) * self.w3(x)))


class FusionLayerII(nn.Module):
    """Pre-norm block with learnable residual scales: RMSNorm->GAT, RMSNorm->MoE, RMSNorm->SwiGLU.
    The MoE runs on present modality tokens only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.d_emb, cfg.t5_eps
        self.n1, self.n2, self.n3 = (nn.RMSNorm(d, eps=eps) for _ in range(3))
        self.gat = GraphAttention(d, cfg.gat_heads, cfg.fusion_dropout)
        self.moe = SparseMoE(d, cfg.expert_hidden, cfg.n_experts, cfg.top_k, cfg.gate_noise, cfg.fusion_dropout, eps)
        self.ffn = SwiGLU(d, cfg.swiglu_hidden, cfg.fusion_dropout)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x, adj, allowed, present):
        x = x + self.scale[0] * self.gat(self.n1(x), adj, allowed)
        h = self.n2(x)
        y, aux = self.moe(h[present])
        moe_out = torch.zeros_like(h)
        if y.shape[0]:
            moe_out = moe_out.index_put(present.nonzero(as_tuple=True), y)
        x = x + self.scale[1] * moe_out
        x = x + self.scale[2] * self.ffn(self.n3(x))
        return x, aux


class ModalityFFN(nn.Module):
    """A separate Linear -> BatchNorm1d -> GELU -> Dropout per modality, computed for all
    modalities at once (a grouped linear; BatchNorm1d over the M*d features is exactly one
    BatchNorm1d(d) per modality).

    A modality's BatchNorm statistics come from the samples that have it: an absent modality's row holds a
    placeholder (learned token, or zeros with generators), and counting it would let the share of missing
    windows in a batch shift how every present window is normalised."""

    def __init__(self, n_modalities: int, d: int, dropout: float, norm: str = "batch"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_modalities, d, d))
        self.bias = nn.Parameter(torch.empty(n_modalities, d))
        bound = 1 / math.sqrt(d)
        nn.init.uniform_(self.weight, -bound, bound)  # nn.Linear's default init, per modality
        nn.init.uniform_(self.bias, -bound, bound)
        self.bn = norm_layer(norm, n_modalities * d, groups=n_modalities)  # per modality either way
        self.drop = nn.Dropout(dropout)

    def forward(self, e: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        b, m, d = e.shape
        h = torch.einsum("bmi,mio->bmo", e, self.weight) + self.bias
        # batch statistics only exist in training; at evaluation every row uses the running statistics anyway
        if (present is None or not self.bn.training or bool(present.all())
                or not isinstance(self.bn, nn.BatchNorm1d)):
            h = self.bn(h.reshape(b, m * d)).reshape(b, m, d)
        else:
            h = self._present_batch_norm(h, present)
        return self.drop(F.gelu(h))

    def _present_batch_norm(self, h: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Training: per modality, batch statistics (and running-statistic updates) over its present rows only;
        absent rows (ignored downstream) and too-small groups are normalised with the running statistics."""
        bn, (_, m, d) = self.bn, h.shape
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        cols = []
        for j in range(m):
            sl = slice(j * d, (j + 1) * d)
            stats = (bn.running_mean[sl], bn.running_var[sl], bn.weight[sl], bn.bias[sl])
            col = F.batch_norm(h[:, j], *stats, training=False, eps=bn.eps)
            rows = present[:, j].nonzero(as_tuple=True)[0]
            if len(rows) > 1:
                own = F.batch_norm(h[rows, j], *stats, training=True, momentum=factor, eps=bn.eps)
                col = col.index_copy(0, rows, own)
            cols.append(col)
        return torch.stack(cols, dim=1)


class MAGNET(nn.Module):
    """Multimodal Adaptive Graph Network with Experts (fusion of Time-MAGNET).

    Learnable modality weights -> modality-specific FFN -> adjacency
    ``A = (cos(E_i, E_j) + 1) / 2 * sigmoid(W_adj) + 0.5 I`` -> Fusion Layer I (GAT, residual, LayerNorm)
    -> ``fusion_layers`` x Fusion Layer II -> Fusion Layer III (attention-weighted pooling over present
    nodes -> FFN -> RMSNorm). Absent nodes are masked out as graph neighbours and from the pooling.
    """

    def __init__(self, cfg: ModelConfig, n_modalities: int):
        super().__init__()
        d = cfg.d_emb
        self.out_dim = d
        self.modality_weights = nn.Parameter(torch.ones(n_modalities))
        self.modality_ffn = ModalityFFN(n_modalities, d, cfg.fusion_dropout, cfg.norm)
        self.adj_logits = nn.Parameter(torch.zeros(n_modalities, n_modalities))
        self.gat1 = GraphAttention(d, cfg.gat_heads, cfg.fusion_dropout)
        self.norm1 = nn.LayerNorm(d)
        self.layers = nn.ModuleList(FusionLayerII(cfg) for _ in range(cfg.fusion_layers))
        self.pool_score = nn.Linear(d, 1)
        self.pool_ffn = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.fusion_dropout), nn.Linear(d, d), nn.RMSNorm(d, eps=cfg.t5_eps)
        )

    def adjacency(self, x: torch.Tensor) -> torch.Tensor:
        xn = F.normalize(x, dim=-1)
        cos = xn @ xn.transpose(1, 2)
        eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
        return (cos + 1) / 2 * torch.sigmoid(self.adj_logits) + 0.5 * eye

    def forward(self, e: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = e.shape[1]
        e = e * self.modality_weights.view(1, m, 1)
        x = self.modality_ffn(e, present)
        adj = self.adjacency(x)
        eye = torch.eye(m, dtype=torch.bool, device=x.device)
        allowed = present.unsqueeze(1) | eye  # [B, M(query), M(key)]
        x = self.norm1(x + self.gat1(x, adj, allowed))
        auxes = []
        for layer in self.layers:
            x, aux = layer(x, adj, allowed, present)
            auxes.append(aux)
        aux = torch.stack(auxes).mean() if auxes else _zero(x)
        w = masked_softmax(self.pool_score(x).squeeze(-1), present)
        pooled = (w.unsqueeze(-1) * x).sum(dim=1)
        return self.pool_ffn(pooled), aux


class ConcatFusion(nn.Module):
    """Concatenation of the (missing-token-filled) modality embeddings."""

    def __init__(self, cfg: ModelConfig, n_modalities: int):
        super().__init__()
        self.out_dim = cfg.d_emb * n_modalities

    def forward(self, e: torch.Tensor, present: torch.Tensor):
        return e.flatten(1), _zero(e)


class AttentionFusion(nn.Module):
    """Additive attention over the present modality embeddings: softmax_m(v·tanh(W e_m))."""

    def __init__(self, cfg: ModelConfig, n_modalities: int):
        super().__init__()
        d = cfg.d_emb
        self.out_dim = d
        self.score = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))

    def forward(self, e: torch.Tensor, present: torch.Tensor):
        w = masked_softmax(self.score(e).squeeze(-1), present)
        return (w.unsqueeze(-1) * e).sum(dim=1), _zero(e)
