#!/usr/bin/env python3
"""Fixtures and references for the worker's inference tests (cloud-workers/tests/inference.rs).

  fixtures.py models DIR W H     small ONNX models with known outputs (yolo v8 / v5 layouts,
                                 a classifier) and, in DIR/expected.json, what the worker must
                                 report for a W x H frame: decode, class-aware NMS, letterbox
                                 mapping and softmax top-k computed here with numpy
  fixtures.py text DIR           test photographs with text rendered at known places
                                 (DIR/text-*.png, DIR/boxes.json) and the plain photographs
  fixtures.py ort MODEL IN OUT   runs MODEL with onnxruntime's Python API on the raw float32
                                 tensor IN (IN.json holds its shape); writes each output as
                                 OUT.<k>.f32 and their shapes to OUT.json
"""
import json
import math
import os
import sys

import numpy as np

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../testdata/images")


def const_model(path, out, names=None):
    """A model whose output is the constant `out` (first dim 1) broadcast to the input's batch:
    out + 0 * sum(input) — the input [N, 3, H, W] only sets N."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rank = out.ndim
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
        helper.make_node("Unsqueeze", ["s", "uaxes"], ["s2"]),
        helper.make_node("Mul", ["s2", "zero"], ["z"]),
        helper.make_node("Add", ["z", "c"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.arange(1, rank, dtype=np.int64), "uaxes"),
        numpy_helper.from_array(np.zeros([1] * rank, dtype=np.float32), "zero"),
        numpy_helper.from_array(out.astype(np.float32), "c"),
    ]
    graph = helper.make_graph(
        nodes,
        "const",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"] + list(out.shape[1:]))],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if names is not None:
        m.metadata_props.add(key="names", value=names)
    onnx.checker.check_model(m)
    onnx.save(m, path)


def rnd(x):
    """Rust's f32::round (half away from zero)."""
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


def letterbox(w, h, iw, ih):
    s = min(np.float32(iw) / np.float32(w), np.float32(ih) / np.float32(h))
    rw = min(max(rnd(float(np.float32(w) * s)), 1), iw)
    rh = min(max(rnd(float(np.float32(h) * s)), 1), ih)
    return np.float32(rw) / np.float32(w), np.float32(rh) / np.float32(h), (iw - rw) // 2, (ih - rh) // 2


def iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return 0.0 if union <= 0 else inter / union


def yolo_reference(boxes, classes, scores, w, h, min_score=0.25, max_iou=0.45, keep=100):
    """boxes [B, 4] cx cy w h (model pixels, 64x64 input), scores [B]: decode, NMS, map back."""
    keep_idx = np.nonzero(scores >= np.float32(min_score))[0]
    order = keep_idx[np.argsort(-scores[keep_idx], kind="stable")]
    corners = np.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], 1)
    kept = []
    for i in order:
        if len(kept) == keep:
            break
        if all(classes[k] != classes[i] or iou(corners[k], corners[i]) <= max_iou for k in kept):
            kept.append(i)
    sx, sy, px, py = letterbox(w, h, 64, 64)
    out = []
    for i in kept:
        c = corners[i]
        x0 = float(np.clip((c[0] - px) / sx, 0, w))
        y0 = float(np.clip((c[1] - py) / sy, 0, h))
        x1 = float(np.clip((c[2] - px) / sx, 0, w))
        y1 = float(np.clip((c[3] - py) / sy, 0, h))
        out.append({"class_id": int(classes[i]), "score": float(scores[i]), "box": [x0, y0, x1 - x0, y1 - y0]})
    return out


def models(d, w, h):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(7)
    nb, nc = 60, 3
    # Boxes in clusters so that NMS has work: 6 centres, 10 jittered boxes each.
    centres = rng.uniform(10, 54, size=(6, 2))
    cxcy = np.repeat(centres, 10, axis=0) + rng.normal(0, 1.5, size=(nb, 2))
    wh = rng.uniform(6, 20, size=(nb, 2))
    boxes = np.concatenate([cxcy, wh], 1).astype(np.float32)
    cls = rng.uniform(0, 1, size=(nb, nc)).astype(np.float32) ** 3
    expected = {}
    # v8: [1, 4 + C, B], score = best class score.
    v8 = np.concatenate([boxes.T, cls.T], 0)[None]
    const_model(os.path.join(d, "yolo_v8.onnx"), v8, names="{0: 'person', 1: 'car', 2: 'dog'}")
    expected["yolo_v8"] = yolo_reference(boxes, cls.argmax(1), cls.max(1), w, h)
    # v5: [1, B, 5 + C], score = objectness x best class score.
    obj = rng.uniform(0.3, 1, size=(nb, 1)).astype(np.float32)
    v5 = np.concatenate([boxes, obj, cls], 1)[None]
    const_model(os.path.join(d, "yolo_v5.onnx"), v5)
    best = cls.argmax(1)
    expected["yolo_v5"] = yolo_reference(boxes, best, (obj[:, 0] * cls[np.arange(nb), best]).astype(np.float32), w, h)
    # A classifier's logits: softmax, top 3.
    logits = rng.normal(0, 2, size=(1, 10)).astype(np.float32)
    const_model(os.path.join(d, "classify.onnx"), logits)
    e = np.exp(logits[0] - logits[0].max())
    p = e / e.sum()
    top = np.argsort(-p, kind="stable")[:3]
    expected["classify"] = [{"class_id": int(k), "score": float(p[k])} for k in top if p[k] >= 0.05]
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f)


# Text lines rendered per photograph: (text, x, y, size).
LINES = {
    "coffee.png": [("FRAMELINK 2026", 40, 40, 40), ("Camera 7 exit", 300, 320, 32)],
    "rocket.jpg": [("LAUNCH PAD 39A", 30, 60, 44)],
    "astronaut.png": [("CREW 12", 60, 420, 48), ("Hatch open", 250, 60, 30)],
}


# Photographs used plain only.
PLAIN = ["retina.jpg", "hubble_deep_field.jpg"]


def load(name):
    from PIL import Image

    img = Image.open(os.path.join(IMAGES, name)).convert("RGB")
    if max(img.size) > 640:
        img.thumbnail((640, 640))
    return img


def text(d):
    from PIL import ImageDraw, ImageFont

    os.makedirs(d, exist_ok=True)
    for name in PLAIN:
        load(name).save(os.path.join(d, "plain-" + os.path.splitext(name)[0] + ".png"))
    boxes = {}
    for name, lines in LINES.items():
        img = load(name)
        img.save(os.path.join(d, "plain-" + os.path.splitext(name)[0] + ".png"))
        draw = ImageDraw.Draw(img)
        found = []
        for t, x, y, size in lines:
            font = ImageFont.load_default(size=size)
            l, tp, r, b = draw.textbbox((x, y), t, font=font)
            # A light plate behind the text, as on a sign.
            draw.rectangle([l - 8, tp - 8, r + 8, b + 8], fill=(235, 235, 225))
            draw.text((x, y), t, font=font, fill=(20, 20, 20))
            found.append([l, tp, r - l, b - tp])
        out = "text-" + os.path.splitext(name)[0] + ".png"
        img.save(os.path.join(d, out))
        boxes[out] = found
    with open(os.path.join(d, "boxes.json"), "w") as f:
        json.dump(boxes, f)


def run_ort(model, inp, out):
    import onnxruntime as ort

    with open(inp + ".json") as f:
        shape = json.load(f)
    x = np.fromfile(inp, dtype=np.float32).reshape(shape)
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    outs = s.run(None, {s.get_inputs()[0].name: x})
    for k, o in enumerate(outs):
        o.astype(np.float32).tofile(f"{out}.{k}.f32")
    with open(out + ".json", "w") as f:
        json.dump([list(o.shape) for o in outs], f)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "models":
        models(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "text":
        text(sys.argv[2])
    elif cmd == "ort":
        run_ort(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
