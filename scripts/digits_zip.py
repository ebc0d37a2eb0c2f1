#!/usr/bin/env python3
"""Turns scikit-learn's real handwritten digits (1,797 8x8 greyscale images, shipped inside
the package) into a zip of PNGs with one folder per class, kiln's image-dataset layout.

    python3 scripts/digits_zip.py OUT.zip --digits 0-4
    python3 scripts/digits_zip.py train.zip --digits 5-9 --per-class 10
    python3 scripts/digits_zip.py heldout.zip --digits 5-9 --skip 10 --per-class 60

Each class's images are shuffled with --seed; --skip drops the first K of that order, so
disjoint sets come from the same seed (train: --per-class 10; held out: --skip 10).
PNGs are written with the standard library (zlib), so only scikit-learn is needed.
"""
import argparse
import random
import struct
import sys
import zipfile
import zlib


def png_grey(pixels, width, height):
    """An 8-bit greyscale PNG of rows of 0-255 values."""
    raw = b"".join(b"\x00" + bytes(pixels[y * width:(y + 1) * width]) for y in range(height))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def digit_range(text):
    out = set()
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--digits", default="0-9", help="classes to include, e.g. 0-4 or 1,3,5")
    ap.add_argument("--per-class", type=int, default=None, help="images per class (default: all)")
    ap.add_argument("--skip", type=int, default=0, help="skip the first K shuffled images of each class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scikit-learn is needed: pip install scikit-learn")
    digits = load_digits()
    rng = random.Random(args.seed)
    with zipfile.ZipFile(args.out, "w", zipfile.ZIP_DEFLATED) as z:
        total = 0
        for d in digit_range(args.digits):
            idx = [i for i, t in enumerate(digits.target) if t == d]
            rng.shuffle(idx)
            idx = idx[args.skip:]
            if args.per_class is not None:
                idx = idx[:args.per_class]
            for i in idx:
                # sklearn's values are 0-16; ink is high. Scale to 0-255.
                pixels = [min(255, int(v * 255 / 16)) for v in digits.images[i].reshape(-1)]
                z.writestr(f"digits/{d}/{i:04d}.png", png_grey(pixels, 8, 8))
                total += 1
    print(f"{args.out}: {total} images of digits {args.digits}")


if __name__ == "__main__":
    main()
