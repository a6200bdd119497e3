#!/usr/bin/env python3
"""Lay out the registry-shipped sample images for caev2.

usage: make_sample_data.py DOWNLOADS_DIR OUT_DIR

DOWNLOADS_DIR holds the wheels of foolbox, scikit-image and timm (downloaded
with --no-deps by scripts/setup.sh). Writes:

  OUT_DIR/imagenet-mini/<wnid>/imagenet_NN_CLS.jpg   foolbox's 20 ImageNet
      photos in ImageNet folder layout (class index -> wnid from timm's
      imagenet_synsets.txt)
  OUT_DIR/photos/*.{png,jpg}   scikit-image's natural photos, unlabelled,
      in the formats they ship (RGB, grayscale, RGBA PNG, JPEG)
  OUT_DIR/imagenet-mini-labels.tsv   wnid, class index and a 2-way label
      (ImageNet-1k classes 0-397 are animals, the rest objects, food, plants
      and scenes) for the default job's k-NN check
"""
import glob
import os
import re
import sys
import zipfile

SKIMAGE_PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg",
    "retina.jpg", "logo.png", "motorcycle_left.png", "horse.png", "brick.png",
]


def wheel(dl: str, prefix: str) -> zipfile.ZipFile:
    paths = glob.glob(os.path.join(dl, prefix + "-*.whl"))
    if len(paths) != 1:
        sys.exit(f"expected one {prefix} wheel in {dl}, found {paths}")
    return zipfile.ZipFile(paths[0])


def main(dl: str, out: str) -> None:
    with wheel(dl, "timm") as z:
        wnids = z.read("timm/data/_info/imagenet_synsets.txt").decode().split()
    assert len(wnids) == 1000, len(wnids)
    n = 0
    seen = {}
    with wheel(dl, "foolbox") as z:
        for name in z.namelist():
            m = re.fullmatch(r"foolbox/data/(imagenet_\d+_(\d+)\.jpg)", name)
            if not m:
                continue
            seen[wnids[int(m.group(2))]] = int(m.group(2))
            d = os.path.join(out, "imagenet-mini", wnids[int(m.group(2))])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, m.group(1)), "wb") as f:
                f.write(z.read(name))
            n += 1
    with open(os.path.join(out, "imagenet-mini-labels.tsv"), "w") as f:
        f.write("wnid\tclass_index\tkind\n")
        for wnid, idx in sorted(seen.items()):
            f.write(f"{wnid}\t{idx}\t{'animal' if idx <= 397 else 'object'}\n")
    os.makedirs(os.path.join(out, "photos"), exist_ok=True)
    with wheel(dl, "scikit_image") as z:
        for p in SKIMAGE_PHOTOS:
            with open(os.path.join(out, "photos", p), "wb") as f:
                f.write(z.read("skimage/data/" + p))
    print(f"sample data: {n} ImageNet photos, {len(SKIMAGE_PHOTOS)} scikit-image photos in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
