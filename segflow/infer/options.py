"""What an inference run is asked to do (:class:`InferenceOptions`) and what it did
(:class:`InferenceReport`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from segflow.config.segment import SegmentOptions, SegmentRequest
from segflow.errors import ConfigError, option
from segflow.tiling import round_up

__all__ = ["InferenceOptions", "InferenceReport"]


# ----------------------------------------------------------------------------- options
# flipped dims of (batch, band, y, x) per TTA set; each set is a group (its own inverse)
_TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "flips": ((), (3,), (2,), (2, 3)),
    "horizontal": ((), (3,)),
    "rot180": ((), (2, 3)),
}


_USER = SegmentOptions()
# the values each choice option allows (checked in order: mode first)
_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("crop", "gaussian"),
    "tta_set": tuple(_TTA_FLIPS),
    "amp": ("auto", "off", "bf16", "fp16"),
    "output": ("probabilities", "labels", "both"),
    "probability_dtype": ("uint8", "float16"),
}


@dataclass(frozen=True, kw_only=True)
class InferenceOptions:
    """How :func:`predict_region` runs.

    Parameters
    ----------
    tile
        ``crop``: output tile side T (best a multiple of the store's write unit, or a divisor
        of it, so no tile straddles two units). ``gaussian``: sets the default window.
    halo
        Context on each side, at least the model's receptive-field radius (from the checkpoint).
    mode
        ``crop`` (each pixel from exactly one tile) or ``gaussian`` (weighted overlap).
    overlap
        ``gaussian`` only: window overlap fraction, stride ``int(window * (1 - overlap))``.
    window
        ``gaussian`` only: window side; default ``round_up(tile + 2*halo, size_multiple)``,
        the same model input as ``crop`` mode.
    size_multiple
        The model's input side must be a multiple of this (``2**depth`` for a U-Net).
    batch_size, device, amp
        Tiles per forward; ``None`` picks CUDA when available; ``auto`` is bf16 on CUDA
        devices that support it, else fp16, and off on CPU.
    tta_flips, tta_set
        Average the softmax over flipped copies of each window: ``flips`` identity,
        left-right, up-down and both (all four, for models trained with flips and quarter
        turns); ``horizontal`` identity and left-right (models trained with left-right flips
        only); ``rot180`` identity and both axes (quarter turns only).
    prefetch, read_workers
        Batches read ahead and reader threads.
    output, probability_dtype, label_nodata
        What is written, how probabilities are stored, the label of invalid pixels.
    strip_width
        Pixels per column strip of units (bounds memory; see the module notes).
    """

    # the user-facing options' defaults are segment_region's (declared in segflow.config)
    tile: int = _USER.tile
    halo: int
    mode: Literal["crop", "gaussian"] = _USER.mode
    overlap: float = _USER.overlap
    window: int | None = None
    size_multiple: int = 1
    batch_size: int = _USER.batch_size
    device: str | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = SegmentRequest.model_fields["amp"].default
    tta_flips: bool = False
    tta_set: Literal["flips", "horizontal", "rot180"] = "flips"
    prefetch: int = 2
    read_workers: int = 2
    output: Literal["probabilities", "labels", "both"] = "both"
    probability_dtype: Literal["uint8", "float16"] = "uint8"
    label_nodata: int = 255
    strip_width: int = 8192

    def __post_init__(self) -> None:
        self._check_geometry()
        for name in ("size_multiple", "batch_size", "prefetch", "read_workers", "strip_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if not 0 <= self.label_nodata <= 65535:
            raise ConfigError(f"label_nodata must be in [0, 65535], got {self.label_nodata}")

    def _check_geometry(self) -> None:
        """Tile, halo, window and overlap: sizes that make sense together."""
        if self.tile <= 0:
            raise ConfigError(f"tile must be > 0, got {self.tile}: use e.g. {option('tile', 512)}")
        if self.halo < 0:
            raise ConfigError(f"halo must be >= 0, got {self.halo}: use the checkpoint's halo")
        if self.mode == "crop" and self.tile < 2 * self.halo:
            raise ConfigError(
                f"tile {self.tile} is smaller than twice the halo {self.halo}: most of each "
                f"window would be context; use {option('tile', round_up(2 * self.halo, 16))} or more"
            )
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}: use e.g. 0.5")
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"window must be > 0, got {self.window}")
        if self.window is not None and self.mode == "crop":
            raise ConfigError(
                f"window={self.window} applies to mode 'gaussian' only; in 'crop' mode the "
                "model input is tile + 2 * halo: leave window unset"
            )

    @property
    def window_size(self) -> int:
        """The model input side for this mode."""
        if self.mode == "gaussian" and self.window is not None:
            return self.window
        return round_up(self.tile + 2 * self.halo, self.size_multiple)

    @property
    def labels_only(self) -> bool:
        """Whether nothing needs probabilities: class ids only, no blending, no flips."""
        return self.output == "labels" and self.mode == "crop" and not self.tta_flips


@dataclass(frozen=True)
class InferenceReport:
    """What one :func:`predict_region` call did.

    ``tiles`` counts model input windows computed (a flip-TTA window counts once); ``pixels``
    the output pixels written; ``skipped_units`` the units already done (resumed);
    ``empty_units`` the units with no valid pixel, written as nodata without the model.
    ``seconds_in_model`` is the model's own forward time (CUDA-synchronized; softmax,
    argmax and the copy to the host are the engine's). ``peak_rss_bytes`` is
    the process's peak resident memory so far (not only this call); ``peak_gpu_bytes`` the
    CUDA allocator peak during the call.
    """

    store_path: str
    tiles: int
    units: int
    pixels: int
    skipped_units: int
    empty_units: int
    num_classes: int | None
    seconds: float
    seconds_in_model: float
    device: str
    amp: str
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None
    # on a Dask cluster: per worker address, its units, tiles, pixels and seconds
    workers: dict[str, dict[str, float]] | None = None
