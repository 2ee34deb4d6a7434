"""The multimodal network and the model registry (``build_model``)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import (
    ACC_CHANNELS,
    ACC_MODALITIES,
    FRAME_MODALITIES,
    FRAME_SHAPES,
    MODALITIES,
    NUM_CLASSES,
    ModelConfig,
    get_config,
)
from .encoders import DartCNN, LSTMEncoder, TimeSeriesEncoder, norm_layer
from .alignment import ModalityAlignment
from .fusion import MAGNET, AttentionFusion, ConcatFusion
from .generators import GATES, OBJECTIVES, LatentGenerators


class HierarchicalClassifier(nn.Sequential):
    """Progressively smaller layers: Linear -> GELU -> BatchNorm -> Dropout per hidden layer, then
    Linear to the classes (paper: 512 -> 512 -> 256 -> 128 -> 7)."""

    def __init__(self, d_in: int, hidden: Sequence[int], dropouts: Sequence[float], num_classes: int,
                 norm: str = "batch"):
        layers: list[nn.Module] = []
        for h, p in zip(hidden, dropouts, strict=True):
            layers += [nn.Linear(d_in, h), nn.GELU(), norm_layer(norm, h), nn.Dropout(p)]
            d_in = h
        layers.append(nn.Linear(d_in, num_classes))
        super().__init__(*layers)


def _encoder(kind: str, cfg: ModelConfig, modality: str) -> nn.Module:
    if kind == "lstm":
        if modality in ACC_MODALITIES:
            return LSTMEncoder(cfg, ACC_CHANNELS)
        pool = tuple(getattr(cfg, f"{modality}_pool"))
        h, w = FRAME_SHAPES[modality]
        return LSTMEncoder(cfg, (h // pool[0]) * (w // pool[1]), pool)
    if modality in ACC_MODALITIES:
        return TimeSeriesEncoder(cfg, modality, ACC_CHANNELS)
    return DartCNN(cfg, modality)


# fusion name -> (encoder kind, fusion class, modalities it can use or None for all)
FUSIONS: dict[str, tuple[str, type[nn.Module], tuple[str, ...] | None]] = {
    "magnet": ("default", MAGNET, None),
    "concat": ("default", ConcatFusion, None),
    "attention": ("default", AttentionFusion, None),
    "lstm": ("lstm", ConcatFusion, None),
    "dart": ("default", ConcatFusion, FRAME_MODALITIES),
}


#: the modules after the encoders, in forward order (what `MultimodalHAR.head` runs)
HEAD_MODULES = ("alignment", "fusion", "classifier")


class MultimodalHAR(nn.Module):
    """Per-modality encoders -> missing-modality tokens -> fusion -> hierarchical classifier.

    ``forward(batch)`` takes the batch dict of the data contract (``batch["mask"]`` bool ``[B, 4]``
    in ``MODALITIES`` order; all-present when absent) and returns ``(logits [B, C], aux_loss)``.
    An absent modality's embedding is replaced by a learned per-modality token; its encoder only
    runs on the samples that have it. Fusions that mask absent nodes (MAGNET: graph neighbours, MoE,
    pooling; attention) never let the token reach the logits while one modality is present, so there
    it is inert; concatenation fusions feed it on.
    With ``latent_generators`` (FedMobile-style), an absent modality's embedding is instead generated from
    the present ones and takes part in the fusion; ``generator_loss`` then holds the last training
    forward's distillation loss, which the training loop adds to the objective (with
    ``cfg.generator_objective == "prediction"`` it includes :meth:`prediction_distill_loss`).
    With ``unimodal_heads``, a linear classifier per modality reads that modality's own embedding; a training
    forward leaves their logits in ``unimodal_logits`` ``[B, M, C]`` (presence in ``unimodal_present``) for the
    training loop's auxiliary loss, so that every encoder must classify alone: what a window with one or two
    sensors relies on. They take no part in the fused prediction.
    """

    def __init__(self, cfg: ModelConfig, fusion: str, modalities: Sequence[str], num_classes: int,
                 latent_generators: bool = False, unimodal_heads: bool = False, modality_alignment: bool = False):
        super().__init__()
        enc_kind, fusion_cls, allowed = FUSIONS[fusion]
        mods = [m for m in MODALITIES if m in modalities]
        if allowed is not None:
            mods = [m for m in mods if m in allowed]
        if not mods:
            raise ValueError(f"fusion {fusion!r} has no usable modality among {tuple(modalities)}")
        self.cfg, self.fusion_name, self.num_classes = cfg, fusion, num_classes
        self.modalities = tuple(mods)
        self.register_buffer(
            "modality_index", torch.tensor([MODALITIES.index(m) for m in mods]), persistent=False
        )
        self.encoders = nn.ModuleDict({m: _encoder(enc_kind, cfg, m) for m in mods})
        generated = latent_generators and len(mods) > 1  # then an absent modality is generated: no token
        self.missing_tokens = nn.ParameterDict(
            {} if generated else {m: nn.Parameter(torch.randn(cfg.d_emb) * 0.02) for m in mods}
        )
        self.fusion = fusion_cls(cfg, len(mods))
        self.classifier = HierarchicalClassifier(
            self.fusion.out_dim, cfg.cls_hidden, cfg.cls_dropout, num_classes, cfg.norm
        )
        if cfg.generator_objective not in OBJECTIVES:
            raise ValueError(f"generator_objective must be one of {OBJECTIVES}, got {cfg.generator_objective!r}")
        self.generators = (LatentGenerators(len(mods), cfg.d_emb, gate=GATES[cfg.generator_objective])
                           if generated else None)
        self.generator_loss = torch.zeros(())
        self.unimodal_heads = (nn.ModuleDict({m: nn.Linear(cfg.d_emb, num_classes) for m in mods})
                               if unimodal_heads else None)
        self.unimodal_logits: torch.Tensor | None = None
        self.unimodal_present: torch.Tensor | None = None
        self.alignment = (ModalityAlignment(len(mods), cfg.d_emb, heads=2)
                          if modality_alignment and len(mods) > 1 else None)

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality embeddings ``[B, M, d]`` (absent ones = learned tokens) and presence ``[B, M]``."""
        first = batch[self.modalities[0]]
        b = first.shape[0]
        mask = batch.get("mask")
        if mask is None:
            present = torch.ones(b, len(self.modalities), dtype=torch.bool, device=first.device)
        else:
            present = mask.to(device=first.device, dtype=torch.bool).index_select(1, self.modality_index.to(first.device))
        embs = []
        for j, m in enumerate(self.modalities):
            if m in self.missing_tokens:
                token = self.missing_tokens[m].unsqueeze(0).expand(b, -1)
            else:
                token = first.new_zeros(b, self.cfg.d_emb, dtype=torch.float32)
            p = present[:, j]
            x = batch[m]
            if x.dtype != torch.float32:
                x = x.float()
            if bool(p.all()):
                e = self.encoders[m](x).float()
            elif bool(p.any()):
                idx = p.nonzero(as_tuple=True)[0]
                e = token.index_copy(0, idx, self.encoders[m](x.index_select(0, idx)).float())
            else:
                e = token
            embs.append(e)
        return torch.stack(embs, dim=1), present

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(*self.embed(batch))

    def head(self, e: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after the encoders: (alignment,) fusion and classifier on the embeddings ``e [B, M, d]``
        of :meth:`embed` (FedEPA's personalized aggregation trains its mixing weights on the head alone)."""
        if self.unimodal_heads is not None and self.training:
            self.unimodal_logits = torch.stack(
                [self.unimodal_heads[m](e[:, j]) for j, m in enumerate(self.modalities)], dim=1)
            self.unimodal_present = present
        if self.alignment is not None:
            e = self.alignment(e, present)
        real = e, present
        if self.generators is not None:
            if self.training:
                self.generator_loss = self.generators.distill_loss(e, present)
            if not bool(present.all()):
                e, present = self.generators.fill(e, present)
        feats, aux = self.fusion(e, present)
        logits = self.classifier(feats)
        if self.generators is not None and self.training and self.cfg.generator_objective == "prediction":
            self.generator_loss = self.generator_loss + self.prediction_distill_loss(*real, logits.detach())
        return logits, aux

    def frozen_head(self, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fusion + classifier in eval mode with detached weights: gradients reach ``e`` only, and neither the
        weights nor the BatchNorm statistics move."""
        was = self.fusion.training, self.classifier.training
        self.fusion.eval()
        self.classifier.eval()
        try:
            def frozen(module: nn.Module) -> dict[str, torch.Tensor]:
                return {k: v.detach() for k, v in (*module.named_parameters(), *module.named_buffers())}

            feats, _ = functional_call(self.fusion, frozen(self.fusion), (e, present))
            return functional_call(self.classifier, frozen(self.classifier), (feats,))
        finally:
            self.fusion.train(was[0])
            self.classifier.train(was[1])

    def prediction_distill_loss(self, e: torch.Tensor, present: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean over modalities j of KL(teacher ‖ student) on the windows that have j: the student is the frozen
        head fed j's *generated* embedding (from a random subset of the other present modalities, the rest left
        out), the teacher the model's prediction with the real one. Only the generators receive its gradient: it
        teaches them the embedding that makes the fusion answer as it would with the sensor, which the cross-
        subject R² of the embedding itself does not measure."""
        gens = self.generators
        src = e.detach()
        target = F.softmax(teacher.float(), dim=-1)
        xs, seens, targets, groups = [], [], [], []
        for j, (avail, rows) in enumerate(gens.distill_inputs(present)):
            if not bool(rows.any()):
                continue
            x, seen = src[rows], avail[rows].clone()
            generated = gens.generate(x, seen, j).to(x.dtype).unsqueeze(1)
            xs.append(torch.cat([x[:, :j], generated, x[:, j + 1:]], dim=1))
            seen[:, j] = True
            seens.append(seen)
            targets.append(target[rows])
            groups.append(int(rows.sum()))
        if not xs:
            return src.new_zeros(())
        # one pass of the head for every modality's students (small batches: the call, not the rows, costs)
        student = F.log_softmax(self.frozen_head(torch.cat(xs), torch.cat(seens)).float(), dim=-1)
        kl = F.kl_div(student, torch.cat(targets), reduction="none").sum(-1)
        return torch.stack([part.mean() for part in kl.split(groups)]).mean()


def build_model(
    preset: "str | ModelConfig" = "compact",
    fusion: str = "magnet",
    modalities: Iterable[str] | str = MODALITIES,
    num_classes: int = NUM_CLASSES,
    *,
    seed: int | None = None,
    latent_generators: bool = False,
    unimodal_heads: bool = False,
    modality_alignment: bool = False,
    **overrides,
) -> MultimodalHAR:
    """Build a model by preset and fusion name.

    ``fusion`` is one of ``FUSIONS``: ``magnet`` (Time-MAGNET), ``concat``, ``attention``, ``lstm``
    (LSTM encoders + concatenation), ``dart`` (DART-CNN on the frame modalities alone).
    ``modalities`` is any subset of ``MODALITIES`` (a tuple or ``"act,acw,pm"``); encoders are built
    only for those. Frozen T5 base weights come from ``cfg.base_seed`` whatever the global RNG state.
    With ``seed``, the trainable initialisation is seeded too (and the global RNG is left untouched);
    without it, it follows the caller's global RNG. ``latent_generators`` adds the FedMobile-style
    cross-modal generators (``model/generators.py``); ``unimodal_heads`` the per-modality classifiers of the
    unimodal auxiliary loss. ``overrides`` replace ModelConfig fields.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose from {sorted(FUSIONS)}")
    if isinstance(modalities, str):
        modalities = [m.strip() for m in modalities.split(",") if m.strip()]
    modalities = tuple(modalities)
    unknown = set(modalities) - set(MODALITIES)
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
    cfg = get_config(preset, **overrides)
    if seed is None:
        return MultimodalHAR(cfg, fusion, modalities, num_classes, latent_generators, unimodal_heads,
                             modality_alignment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalHAR(cfg, fusion, modalities, num_classes, latent_generators, unimodal_heads,
                             modality_alignment)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def parameter_breakdown(model: MultimodalHAR) -> dict[str, dict[str, int]]:
    parts = {f"encoder.{m}": enc for m, enc in model.encoders.items()}
    parts["fusion"] = model.fusion
    parts["classifier"] = model.classifier
    if model.generators is not None:
        parts["generators"] = model.generators
    if model.unimodal_heads is not None:
        parts["unimodal_heads"] = model.unimodal_heads
    if model.alignment is not None:
        parts["alignment"] = model.alignment
    out = {k: count_parameters(v) for k, v in parts.items()}
    out["missing_tokens"] = {"total": sum(p.numel() for p in model.missing_tokens.values())}
    return out
