#!/usr/bin/env python3
"""Reference rendering of caev2 views with Pillow, the way torchvision does it.

usage: pil_reference.py SPEC.json OUT.bin

SPEC: {"image": path, "size": N, "views": [{"order": "cbs", "brightness": f,
"contrast": f, "saturation": f, "flip": bool, "top": i, "left": j,
"height": h, "width": w}, ...]}. The image is decoded by Pillow and converted
to RGB (only lossless formats are used by the test, so the decoders agree).
Writes each view's N x N x 3 RGB bytes, concatenated.

This is torchvision's ColorJitter/RandomHorizontalFlip/RandomResizedCrop on
PIL images with the sampled parameters fixed: F.adjust_* call ImageEnhance,
hflip is Image.transpose(FLIP_LEFT_RIGHT), resized_crop is crop + resize.
"""
import json
import sys

from PIL import Image, ImageEnhance

OPS = {"b": ImageEnhance.Brightness, "c": ImageEnhance.Contrast, "s": ImageEnhance.Color}
NAMES = {"b": "brightness", "c": "contrast", "s": "saturation"}


def render(img, v, size):
    for code in v["order"]:
        img = OPS[code](img).enhance(v[NAMES[code]])
    if v["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.crop((v["left"], v["top"], v["left"] + v["width"], v["top"] + v["height"]))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    img = Image.open(spec["image"]).convert("RGB")
    with open(out_path, "wb") as out:
        for v in spec["views"]:
            out.write(render(img, v, spec["size"]).tobytes())


if __name__ == "__main__":
    main(*sys.argv[1:])
