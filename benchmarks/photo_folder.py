"""Write a folder of mixed-size colour photos with real labels, the kind of folder a user brings.

The images are mnist5k's real handwritten digits (DESIGN.md's split: test = index % 5 == 0), or with ``--data
fashion-mnist`` its real clothing photos (60,000 train / 10,000 test), each drawn in a random dark ink colour on
a random light paper colour with pixel noise, resized to a random size between
``--min-size`` and ``--max-size`` pixels a side (not square: the aspect ratio varies ±20 %), and saved as
JPEG or PNG (alternating) under DIR/train/<class>/ and DIR/test/<class>/. Deterministic for a seed.

    python benchmarks/photo_folder.py DIR [--data mnist5k] [--per-class-train 400] [--per-class-test 100]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from qkit.data import load_dataset


def write_photo_folder(out: Path, per_class_train: int = 400, per_class_test: int = 100, min_size: int = 24,
                       max_size: int = 64, seed: int = 0, prefix: str = "", data: str = "mnist5k") -> Path:
    """``prefix`` starts every file name, so that draws with other seeds can share one folder."""
    ds = load_dataset(data)
    rng = np.random.default_rng(seed)
    for split, x, y, per_class in (("train", ds.x_train, ds.y_train, per_class_train),
                                   ("test", ds.x_test, ds.y_test, per_class_test)):
        for label in range(ds.num_classes):
            folder = out / split / ds.labels[label].replace("/", "-")  # fashion-mnist's "t-shirt/top"
            folder.mkdir(parents=True, exist_ok=True)
            for i, idx in enumerate(np.flatnonzero(y.numpy() == label)[:per_class]):
                ink, paper = rng.uniform(0, 110, 3), rng.uniform(150, 255, 3)  # dark ink on light paper
                a = x[idx, 0].numpy()[..., None]
                rgb = a * ink + (1 - a) * paper + rng.normal(0, 8, (*a.shape[:2], 3))
                side = rng.integers(min_size, max_size + 1)
                w, h = side, int(np.clip(side * rng.uniform(0.8, 1.2), min_size, max_size))
                im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
                im.save(folder / f"{prefix}{i:04d}.{'jpg' if i % 2 else 'png'}", quality=90)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "fashion-mnist"])
    p.add_argument("--per-class-train", type=int, default=400)
    p.add_argument("--per-class-test", type=int, default=100)
    p.add_argument("--min-size", type=int, default=24)
    p.add_argument("--max-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_photo_folder(a.out, a.per_class_train, a.per_class_test, a.min_size, a.max_size, a.seed, data=a.data)
    print(a.out)


if __name__ == "__main__":
    main()
