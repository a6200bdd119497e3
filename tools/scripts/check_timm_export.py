#!/usr/bin/env python3
"""Check a `caev2 export` file against timm.

usage: python check_timm_export.py encoder.safetensors
needs: pip install torch timm safetensors

Builds timm's ViT from encoder.json's `architecture` and `timm_kwargs`, loads
the weights strictly (every key, every shape), runs the reference input from
encoder.check.safetensors through `forward_features` and compares with the
features caev2 computed. Prints the max abs difference; exits 1 above 1e-4.
"""
import json
import sys

import timm
import torch
from safetensors.torch import load_file


def main(path):
    cfg = json.load(open(path.rsplit(".", 1)[0] + ".json"))
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["timm_kwargs"]).eval()
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=True), None
    ref = load_file(path.rsplit(".", 1)[0] + ".check.safetensors")
    with torch.no_grad():
        ours = ref["features"]
        theirs = model.forward_features(ref["input"])
    err = (ours - theirs).abs().max().item()
    print(f"{cfg['architecture']}: loaded {len(state)} tensors strictly; max |caev2 - timm| = {err:.2e}")
    sys.exit(0 if err < 1e-4 else 1)


if __name__ == "__main__":
    main(sys.argv[1])
