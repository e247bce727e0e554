"""Images read on demand: what lets a folder larger than memory train.

A split is kept as its stored pixels (uint8 for 8-bit images), in memory or memory-mapped from a file;
each batch is scaled to [0, 1] and normalised when it is indexed. Nothing holds a whole split as floats.
"""
from __future__ import annotations

from typing import IO, Any, Iterator, Sequence

import numpy as np
import torch

CHUNK_BYTES = 4 << 20  # float32 bytes per step when a whole split is walked (statistics): bounded memory


class Images:
    """N×C×H×W images. ``x[i]``, ``x[a:b]`` and ``x[index_array]`` (NumPy or torch) are float32 tensors:
    ``raw / scale``, then ``(· − mean) / std`` per channel once :meth:`normalized`."""

    def __init__(self, raw: np.ndarray, scale: float, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.raw, self.scale = raw, float(scale)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    def normalized(self, mean: Sequence[float], std: Sequence[float]) -> Images:
        """The same pixels, read standardised with ``mean``/``std`` (one value per channel)."""
        return Images(self.raw, self.scale, list(mean), list(std))

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        x = np.asarray(self.raw[index], np.float32) / np.float32(self.scale)
        if self.mean is not None:  # the channel axis is third from last for one image and for a batch
            x = (x - np.asarray(self.mean, np.float32).reshape(-1, 1, 1)) / \
                np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return torch.from_numpy(np.ascontiguousarray(x))

    def chunks(self) -> Iterator[torch.Tensor]:
        """The split in order, about :data:`CHUNK_BYTES` of floats at a time."""
        n = max(1, CHUNK_BYTES // (4 * int(np.prod(self.shape[1:]))))
        for i in range(0, len(self), n):
            yield self[i:i + n]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (sample) standard deviation over every pixel, accumulated in float64."""
        total = np.zeros(self.shape[1])
        squares = np.zeros(self.shape[1])
        for x in self.chunks():
            a = x.numpy().astype(np.float64)
            total += a.sum((0, 2, 3))
            squares += np.square(a).sum((0, 2, 3))
        n = len(self) * self.shape[2] * self.shape[3]
        mean = total / n
        var = np.maximum(squares - n * mean ** 2, 0.0) / max(n - 1, 1)
        return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-6), 6) for v in np.sqrt(var)]

    def all_finite(self) -> bool:
        return np.issubdtype(self.raw.dtype, np.integer) or all(bool(torch.isfinite(x).all()) for x in self.chunks())


def npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the ``.npy`` array ``fh`` is at, leaving ``fh`` at its data: what a
    file declares, read before anything is allocated or mapped."""
    header = {(1, 0): np.lib.format.read_array_header_1_0,
              (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(fh))
    if header is None:
        raise ValueError("an unsupported .npy format version")
    return header(fh)
