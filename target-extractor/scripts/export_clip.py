#!/usr/bin/env python3
"""Export a CLIP vision tower to ONNX as a caev2 teacher.

The output `tokens` [B, 197, D] is exactly CAE v2's target (REFERENCE.md):
the final transformer output with `ln_post` (HF: `post_layernorm`) applied
to EVERY token, then `@ proj` (HF: `visual_projection`). CLS is kept.

  base16:  ViT-B/16 at 224 px -> 197 x 512   (student ViT-T/S/B)
  large14: ViT-L/14 at 196 px -> 197 x 768   (student ViT-L; position
           embeddings interpolated from 224 px, as in the paper)

Real weights (needs network access and `pip install torch transformers onnx`):
  python export_clip.py --model base16 --out .deps/models/clip-vit-b16.onnx
Random weights (no download; verifies the export path and graph shapes):
  python export_clip.py --model base16 --random-weights --out /tmp/clip-b16-random.onnx

Also accepts --weights DIR (a local Hugging Face snapshot). Writes caev2.*
metadata (name, CLIP mean/std, patch, input size, CLS) into the file so
`caev2 extract` needs no further flags.
"""
import argparse

import onnx
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

MODELS = {
    "base16": dict(hub="openai/clip-vit-base-patch16", size=224, patch=16,
                   cfg=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, patch_size=16, projection_dim=512)),
    "large14": dict(hub="openai/clip-vit-large-patch14", size=196, patch=14,
                    cfg=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, patch_size=14, projection_dim=768)),
}
CLIP_MEAN = "0.48145466,0.4578275,0.40821073"
CLIP_STD = "0.26862954,0.26130258,0.27577711"


class Tokens(torch.nn.Module):
    """post_layernorm on every token, then the projection."""

    def __init__(self, model, interpolate):
        super().__init__()
        self.model = model
        self.interpolate = interpolate

    def forward(self, pixels):
        vm = self.model.vision_model
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        h = vm(pixel_values=pixels, **kwargs).last_hidden_state
        return self.model.visual_projection(vm.post_layernorm(h))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--out", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--random-weights", action="store_true")
    g.add_argument("--weights", help="local Hugging Face snapshot folder")
    a = p.parse_args()
    spec = MODELS[a.model]
    if a.random_weights:
        torch.manual_seed(0)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, **spec["cfg"]))
        name = f"clip-vit-{a.model} (RANDOM weights, export test)"
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(a.weights or spec["hub"])
        name = f"clip-vit-{a.model} ({a.weights or spec['hub']})"
    model.eval()
    size = spec["size"]
    wrapper = Tokens(model, interpolate=size != 224).eval()
    dummy = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expect = wrapper(dummy)
        torch.onnx.export(
            wrapper, (dummy,), a.out, input_names=["pixels"], output_names=["tokens"],
            dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    m = onnx.load(a.out)
    for k, v in {
        "caev2.name": name, "caev2.patch_size": str(spec["patch"]), "caev2.default_input_size": str(size),
        "caev2.has_cls": "true", "caev2.mean": CLIP_MEAN, "caev2.std": CLIP_STD, "caev2.output": "tokens",
    }.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(m, a.out)
    try:
        import numpy as np
        import onnxruntime as ort

        got = ort.InferenceSession(a.out).run(None, {"pixels": dummy.numpy()})[0]
        err = float(np.abs(got - expect.numpy()).max())
        print(f"onnxruntime vs torch: max abs error {err:.2e}")
    except ImportError:
        pass
    print(f"wrote {a.out}: tokens {tuple(expect.shape)}")


if __name__ == "__main__":
    main()
