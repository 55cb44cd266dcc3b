"""The forward pass: device and AMP, test-time flips, logits to probabilities and labels."""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from segflow.errors import ConfigError, option
from segflow.geometry import Window
from segflow.infer.options import _TTA_FLIPS, InferenceOptions
from segflow.infer.readers import _Normalizer
from segflow.tiling import TileLayout

__all__ = ["resolve_device"]


def _model_hash(model: torch.nn.Module) -> str:
    """The model's identity for resume: its weights (values, shapes, dtypes, in order).

    Names are left out, so the same weights wrapped in another module still resume.
    """
    h = hashlib.blake2b(digest_size=16)
    for t in model.state_dict().values():
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_device(options: InferenceOptions) -> tuple[torch.device, torch.dtype | None, str]:
    """The torch device, autocast dtype and AMP name ``options`` ask for (checked)."""
    name = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use {option('device', 'cpu')}")
    amp = options.amp
    if amp == "auto":
        if device.type != "cuda":
            return device, None, "off"
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return device, None, "off"
    return device, (torch.bfloat16 if amp == "bf16" else torch.float16), amp


def _check_output(logits: Any, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[2:] != x.shape[2:]:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise ConfigError(
            f"model output must be (batch, classes, {x.shape[2]}, {x.shape[3]}) for input "
            f"{tuple(x.shape)}, got {shape}: check the model's size multiple and halo"
        )
    return logits


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``(batch, classes, y, x)`` logits (one channel: a sigmoid)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def _labels(logits: torch.Tensor) -> torch.Tensor:
    """The argmax class of ``(batch, classes, y, x)`` logits as ``(batch, y, x)``.

    The same class as the argmax of :func:`_probabilities` (softmax and sigmoid are
    monotonic; ties go to the lower class id), without computing them: uint8 for up to 256
    classes. A running maximum over the classes, in element-wise ops, rather than
    ``torch.argmax(dim=1)``, whose CPU kernel took 350 ms for a (4, 2, 1040, 1040) batch
    here (this: 3 ms; 2 classes need one comparison).
    """
    n = logits.shape[1]
    if n == 1:
        return (logits[:, 0] > 0).to(torch.uint8)
    dtype = torch.uint8 if n <= 256 else torch.int32
    best = logits[:, 0]
    out = (logits[:, 1] > best).to(dtype)  # strict: a tie keeps the lower id
    for k in range(2, n):
        best = torch.maximum(best, logits[:, k - 1])
        now = (logits[:, k] > best).to(dtype)
        out += now * (k - out)  # k where now, else unchanged (exact even where uint8 wraps)
    return out


def _flips(options: InferenceOptions) -> tuple[tuple[int, ...], ...]:
    return _TTA_FLIPS[options.tta_set] if options.tta_flips else ((),)


class _Forward:
    """Batches through the model: normalization already done, flips, AMP, timing.

    ``labels_only`` (no blending, no flips: nothing needs probabilities) returns each
    window's argmax class ``(batch, y, x)``; otherwise float32 ``(batch, classes, y, x)``
    probabilities. ``seconds`` times the model alone (CUDA-synchronized): the softmax or
    argmax and the copy to the host count as the engine's work, not the model's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        amp: torch.dtype | None,
        flips: tuple[tuple[int, ...], ...] = ((),),
        *,
        labels_only: bool = False,
    ) -> None:
        if labels_only and len(flips) > 1:
            raise ValueError("flip TTA averages probabilities: labels_only cannot use it")
        self.model = model
        self.device = device
        self.amp = amp
        self.flips = flips
        self.labels_only = labels_only
        self.seconds = 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        flips = self.flips
        if len(flips) > 1:
            x = torch.cat([x.flip(d) if d else x for d in flips])
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=self.amp)
            if self.amp is not None
            else nullcontext()
        )
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            with ctx:
                logits = _check_output(self.model(x), x)
            if cuda:
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - t0
            if self.labels_only:
                return np.asarray(_labels(logits).cpu().numpy())
            p = _probabilities(logits)
            if len(flips) > 1:  # flip each copy back and average
                n = batch.shape[0]
                mean = p[:n].clone()
                for k, d in enumerate(flips[1:], start=1):
                    mean += p[k * n : (k + 1) * n].flip(d)
                p = mean / len(flips)
        return np.asarray(p.cpu().numpy(), dtype=np.float32)


def _probe_classes(
    layout: TileLayout, window: Window, normalize: _Normalizer, forward: _Forward
) -> int:
    """The model's class count, from one forward of the first tile of ``window`` (not timed)."""
    probe = torch.from_numpy(normalize.window(next(iter(layout.touching(window))))[None])
    with torch.inference_mode():
        logits = _check_output(forward.model(probe.to(forward.device)), probe)
    return max(2, int(logits.shape[1]))  # one channel: sigmoid, background and foreground
