"""Write the example data the recipes in examples/ read, from scikit-learn's bundled digits (1,797 8x8 images):

    python examples/make_data.py            # -> examples/data/ (a few seconds)

  digits_images/<class>/<n>.png   class folders of grayscale PNGs, and digits_images/list.csv (a manifest: path, label)
  digits.npz                      x (1797, 1, 8, 8) uint8, y (1797,) class names
  digits_pixels.csv               one row per image: an id column, 64 pixel columns, the label
  digits_hf/                      a Hugging Face DatasetDict (train, test) written by save_to_disk (needs `datasets`)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"))
    out = Path(ap.parse_args().out)
    d = load_digits()
    pixels = (d.images * 255 / 16).round().astype(np.uint8)  # 0..16 -> 0..255
    labels = [NAMES[t] for t in d.target]

    folder = out / "digits_images"
    rows = ["path,label"]
    for i, (img, label) in enumerate(zip(pixels, labels)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(folder / label / f"{i:04d}.png")
        rows.append(f"{label}/{i:04d}.png,{label}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")

    np.savez(out / "digits.npz", x=pixels[:, None], y=np.array(labels))

    header = ["id", *(f"p{k}" for k in range(64)), "digit"]
    lines = [",".join(header)] + [",".join([str(10000 + i), *map(str, img.reshape(-1)), label])
                                  for i, (img, label) in enumerate(zip(pixels, labels))]
    (out / "digits_pixels.csv").write_text("\n".join(lines) + "\n")

    try:
        import datasets
    except ImportError:
        print("datasets is not installed (pip install -e '.[datasets]'): skipped digits_hf/")
    else:
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
        split = {"train": slice(0, 1500), "test": slice(1500, None)}
        parts = {name: datasets.Dataset.from_dict({"image": [Image.fromarray(p, "L") for p in pixels[s]],
                                                   "label": d.target[s].tolist()}, features=feats)
                 for name, s in split.items()}
        datasets.DatasetDict(parts).save_to_disk(str(out / "digits_hf"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
