"""Preprocessing parameters (every field is part of the window cache key)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .constants import ACC_MODALITIES, MODALITIES, SAMPLE_SHAPES


def _steps(seconds: float, rate: float, what: str) -> int:
    n = seconds * rate
    k = int(round(n))
    if k < 1 or abs(n - k) > 1e-6:
        raise ValueError(f"{what}: window_s * rate must be a positive integer, got {seconds} * {rate} = {n}")
    return k


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw MEx recordings become fixed-size windows.

    Paper settings (the defaults): accelerometers at 100 Hz, depth camera and pressure mat at
    15 Hz, 5 s windows every 1 s, giving act/acw ``[500, 3]``, dc ``[75, 12, 16]`` and pm
    ``[75, 32, 16]``. ``on_bad`` says what a malformed recording does: ``"raise"`` a
    :class:`~data_partition.reader.MExFormatError`, or ``"skip"`` it with a warning.
    """

    acc_hz: float = 100.0
    frame_hz: float = 15.0
    window_s: float = 5.0
    step_s: float = 1.0
    on_bad: str = "raise"

    def __post_init__(self) -> None:
        for name in ("acc_hz", "frame_hz", "window_s", "step_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"PreprocessConfig.{name} must be a positive number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.on_bad not in ("raise", "skip"):
            raise ValueError(f"PreprocessConfig.on_bad must be 'raise' or 'skip', got {self.on_bad!r}")
        _steps(self.window_s, self.acc_hz, "acc_hz")
        _steps(self.window_s, self.frame_hz, "frame_hz")

    @property
    def acc_len(self) -> int:
        """Samples per window for act/acw (``Ta``)."""
        return _steps(self.window_s, self.acc_hz, "acc_hz")

    @property
    def frame_len(self) -> int:
        """Frames per window for dc/pm (``Tf``)."""
        return _steps(self.window_s, self.frame_hz, "frame_hz")

    def rate(self, modality: str) -> float:
        return self.acc_hz if modality in ACC_MODALITIES else self.frame_hz

    def steps(self, modality: str) -> int:
        return self.acc_len if modality in ACC_MODALITIES else self.frame_len

    def window_shape(self, modality: str) -> tuple[int, ...]:
        """Shape of one window of ``modality``, e.g. ``(500, 3)`` or ``(75, 32, 16)``."""
        return (self.steps(modality), *SAMPLE_SHAPES[modality])

    def window_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: self.window_shape(m) for m in MODALITIES}

    def to_dict(self) -> dict:
        return asdict(self)
