"""Window readers: where model windows' pixels and valid masks come from, normalized.

A :class:`WindowReader` is anything with ``bands``, ``height``, ``width`` and
``read(window) -> (pixels, valid)``; :class:`_Normalizer` turns one tile's mirrored window
into the model's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from segflow.errors import ConfigError, StoreError
from segflow.geometry import Window
from segflow.io.remote import is_url
from segflow.io.store import SceneStore, store_exists
from segflow.normalization import Normalization
from segflow.stats import valid_and_finite
from segflow.tiling import MirrorPlan, Tile, mirror_plan

if TYPE_CHECKING:
    from segflow.io.sources import Source

__all__ = ["ArrayReader", "SourceReader", "StoreReader", "WindowReader", "open_reader"]


# ----------------------------------------------------------------------------- readers
@runtime_checkable
class WindowReader(Protocol):
    """What the engine needs from an image: its size and window reads inside it.

    ``read_with_valid`` returns the ``(bands, height, width)`` pixels of a window that lies
    inside the image and its ``(height, width)`` boolean footprint, read together so a source
    whose mask comes from its nodata value decodes the window once. It is called from several
    threads at once.
    """

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def bands(self) -> int: ...

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]: ...


class ArrayReader:
    """A :class:`WindowReader` over an in-memory ``(band, y, x)`` array (tests, small images)."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None) -> None:
        if image.ndim != 3:
            raise ConfigError(f"image must be (band, y, x), got shape {image.shape}")
        if valid is not None and valid.shape != image.shape[1:]:
            raise ConfigError(f"valid shape {valid.shape} does not match image {image.shape}")
        self.image = image
        self.valid = valid

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    @property
    def bands(self) -> int:
        return int(self.image.shape[0])

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.image[(slice(None), *window.slices)]
        if self.valid is None:
            return pixels, np.ones(window.shape, dtype=bool)
        return pixels, self.valid[window.slices]


class StoreReader:
    """A :class:`WindowReader` over a scene store's ``image`` and ``valid`` arrays."""

    def __init__(self, store: SceneStore) -> None:
        self.store = store
        self._image = store.array("image")
        self._valid = store.array("valid")
        if self._image.ndim != 3 or self._image.shape[0] == 0:
            raise StoreError(f"store {str(store.path)!r} has no image bands to predict from")

    @property
    def height(self) -> int:
        return int(self._image.shape[1])

    @property
    def width(self) -> int:
        return int(self._image.shape[2])

    @property
    def bands(self) -> int:
        return int(self._image.shape[0])

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.asarray(self._image[(slice(None), *window.slices)])
        return pixels, np.asarray(self._valid[window.slices], dtype=bool)


class SourceReader:
    """A :class:`WindowReader` over a :class:`~segflow.io.sources.Source`."""

    def __init__(self, source: Source) -> None:
        self.source = source

    @property
    def height(self) -> int:
        return self.source.info.height

    @property
    def width(self) -> int:
        return self.source.info.width

    @property
    def bands(self) -> int:
        return len(self.source.info.bands)

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read_with_valid(window)


def open_reader(path: str | Path, level: int = 0, assets: Sequence[str] = ()) -> WindowReader:
    """The :class:`WindowReader` of an image path: a scene store's ``image`` (``level``
    ignored: a store holds one), or a source read at pyramid ``level`` (``assets``: of a
    STAC Item, see :func:`~segflow.io.sources.open_source`)."""
    from segflow.io.sources import open_source

    if store_exists(path):
        return StoreReader(SceneStore.open(path))
    where = path if is_url(path) else Path(path)
    return SourceReader(open_source(where, level=level, assets=assets))


class _Normalizer:
    """Reads one tile: its model window (mirrored past the image) and its core's valid mask.

    Returns ``(x, core_valid)``: ``x`` the window as normalized float32, or ``None`` when
    ``skip_empty`` and no pixel of the core is valid (the tile then needs no model run);
    ``core_valid`` the boolean footprint of ``tile.core``, which always lies inside the image.
    Pixels and mask come from one read, so the writer never reads the image again.

    Invalid pixels are the reader's mask plus every pixel where a band is NaN or +/-inf.
    In ``x`` every invalid pixel holds 0, i.e. the normalization mean, whatever its raw value
    (a nodata value, a finite value under a mask, NaN, inf): NaN never reaches the model, and
    a pixel's neighbours are predicted the same however the pixel was marked nodata.
    """

    def __init__(
        self,
        reader: WindowReader,
        normalization: Normalization,
        *,
        skip_empty: bool = True,
    ) -> None:
        self.reader = reader
        self.normalization = normalization
        self.skip_empty = skip_empty

    def __call__(self, tile: Tile) -> tuple[np.ndarray | None, np.ndarray]:
        plan = mirror_plan(tile.window, self.reader.height, self.reader.width)
        block, valid = self._read(plan)
        core_valid = valid[tile.core.relative_to(plan.source).slices]
        if self.skip_empty and not core_valid.any():
            return None, core_valid
        return self._scale(plan, block, valid), core_valid

    def window(self, tile: Tile) -> np.ndarray:
        """The tile's normalized model window, whatever its valid pixels."""
        plan = mirror_plan(tile.window, self.reader.height, self.reader.width)
        return self._scale(plan, *self._read(plan))

    def _read(self, plan: MirrorPlan) -> tuple[np.ndarray, np.ndarray]:
        """The pixels of ``plan.source`` and their valid mask, non-finite pixels invalid.

        Sources already apply the non-finite rule; this covers every other reader (scene
        stores ingested before the rule, in-memory arrays).
        """
        block, valid = self.reader.read_with_valid(plan.source)
        block = np.asarray(block)
        return block, valid_and_finite(block, valid)

    def _scale(self, plan: MirrorPlan, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        # one defined fill for every invalid pixel: 0, the normalization mean (raw nodata
        # values, finite values under a mask, NaN and inf all look alike to the model)
        return self.normalization.apply(plan.take(block), plan.take(valid))
