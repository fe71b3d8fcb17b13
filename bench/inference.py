"""Inference (experiment 8 of bench/suite.py; also `scripts/bench-inference`): a detection model on
1080p frames, framelink-worker against the same model driven from Python — onnxruntime +
OpenCV pre- and post-processing, the usual way — on the same JPEG bytes, the same ONNX Runtime
library version and the same settings, for ONNX Runtime thread counts 1 and 2.

framelink's side is `framelink-worker bench-detect` (decode with libjpeg-turbo, prepare the
input, run the model in its stage, decode the outputs into boxes: what the worker does per
frame). Python's side: cv2.imdecode, cv2.resize, normalise with numpy, InferenceSession.run,
then DBNet's post-processing with OpenCV (threshold, findContours, box score, unclip). The model
is PP-OCRv4's text detector (scripts/fetch-models) at two input sizes (960x544 and 480x288: the
longer side limited to 960 or 480), on a photograph with text rendered onto it, scaled to
1920x1080. Both sides must find the same number of boxes.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import onnxruntime as ort

from benchlib import ROOT, binary, machine, profile, write_table

MODEL = "ch_PP-OCRv4_det_infer.onnx"
MEAN, STD = 0.5, 0.5
SIDES = (960, 480)  # the model input's longer side
THRESH, BOX_THRESH, UNCLIP, MIN_SIZE = 0.3, 0.5, 1.6, 3


def models_dir():
    out = subprocess.run([os.path.join(ROOT, "scripts", "fetch-models")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def frame(out_dir):
    """A 1920x1080 JPEG (quality 90) of a test photograph with text rendered onto it."""
    path = os.path.join(out_dir, "inference-1080p.jpg")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, os.path.join(ROOT, "cloud-workers/tests/inference/fixtures.py"), "text", d], check=True)
        img = cv2.imread(os.path.join(d, "text-coffee.png"))
    img = cv2.resize(img, (1920, 1080), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def db_size(w, h, max_side):
    r = max_side / max(w, h) if max(w, h) > max_side else 1.0
    return max(32, int(round(w * r / 32)) * 32), max(32, int(round(h * r / 32)) * 32)


def python_detect(sess, name, jpeg, max_side):
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)  # BGR, as the model wants
    h, w = img.shape[:2]
    nw, nh = db_size(w, h, max_side)
    x = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = (x / 255.0 - MEAN) / STD
    x = x.transpose(2, 0, 1)[None]
    t = time.perf_counter()
    prob = sess.run(None, {name: x})[0][0, 0]
    model_ms = (time.perf_counter() - t) * 1e3
    mask = (prob > THRESH).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    boxes = []
    for c in contours[:1000]:
        bx, by, bw, bh = cv2.boundingRect(c)
        if min(bw, bh) < MIN_SIZE:
            continue
        if float(prob[by:by + bh, bx:bx + bw].mean()) < BOX_THRESH:
            continue
        d = bw * bh * UNCLIP / (2 * (bw + bh))
        sx, sy = w / nw, h / nh
        boxes.append(((bx - d) * sx, (by - d) * sy, (bw + 2 * d) * sx, (bh + 2 * d) * sy))
    return boxes, model_ms


def run_python(model, jpeg, threads, seconds, max_side):
    cv2.setNumThreads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    python_detect(sess, name, jpeg, max_side)  # warm-up
    total, infer = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(total) < 3:
        t = time.perf_counter()
        boxes, model_ms = python_detect(sess, name, jpeg, max_side)
        total.append((time.perf_counter() - t) * 1e3)
        infer.append(model_ms)
    elapsed = time.perf_counter() - start
    return {"impl": "python", "threads": threads, "frames": len(total), "fps": len(total) / elapsed,
            "ms_median": statistics.median(total), "model_ms_median": statistics.median(infer), "detections": len(boxes)}


def worker_config(path, model, max_side):
    lib = os.path.join(os.path.dirname(ort.__file__), "capi")
    lib = os.path.join(lib, sorted(f for f in os.listdir(lib) if f.startswith("libonnxruntime.so"))[-1])
    with open(path, "w") as f:
        f.write(f'[kafka]\nbrokers = "127.0.0.1:1"\n[inference]\nlibrary = "{lib}"\n[models.text]\npath = "{model}"\nfamily = "dbnet"\n'
                f'channels = "bgr"\nmean = [{MEAN}, {MEAN}, {MEAN}]\nstd = [{STD}, {STD}, {STD}]\nmax_side = {max_side}\n'
                f'pixel_threshold = {THRESH}\nmin_score = {BOX_THRESH}\nunclip_ratio = {UNCLIP}\nmin_box_size = {MIN_SIZE}\n')


def inference(_bootstrap, out_dir, quick):
    seconds = 1.0 if quick else 10.0
    model = os.path.join(models_dir(), MODEL)
    work = tempfile.mkdtemp(prefix="framelink-inference-")
    jpeg_path = frame(work)
    with open(jpeg_path, "rb") as f:
        jpeg = f.read()
    rows = {}
    for side in SIDES:
        cfg = os.path.join(work, f"worker-{side}.toml")
        worker_config(cfg, model, side)
        for threads in (1, 2):
            out = subprocess.run([binary("framelink-worker"), "bench-detect", "--config", cfg, "--model", "text", "--image", jpeg_path,
                                  "--threads", str(threads), "--seconds", str(seconds)], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"bench-detect failed: {out.stderr}")
            fl = {r["decode"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
            py = run_python(model, jpeg, threads, seconds, side)
            for r in fl.values():
                if r["detections"] != py["detections"]:
                    raise RuntimeError(f"framelink ({r['decode']} decode) found {r['detections']} boxes, Python {py['detections']}: not the same work")
            rows[(side, threads)] = (fl, py)
    lines = [
        "# Inference: a text detector on 1080p frames, framelink-worker vs Python (onnxruntime + OpenCV)",
        "",
        f"Machine: {machine()}; build: {profile()}; ONNX Runtime {ort.__version__} (the same library on both sides), CPU provider; "
        f"PP-OCRv4 text detector; one frame at a time; {seconds:.0f} s per cell. "
        "Per frame: JPEG decode, resize + normalise, model, DBNet post-processing into boxes. "
        "`around the model` = ms/frame minus the model's ms.",
        "",
        "| model input | ORT threads | implementation | frames/s | ms/frame (median) | of which model | around the model | vs Python |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (side, threads), (fl, py) in rows.items():
        size = "x".join(map(str, db_size(1920, 1080, side)))
        cells = [("framelink, full decode (result images published)", fl["full"]),
                 (f"framelink, DCT-scaled decode to {fl['scaled']['decoded']} (`events_only`)", fl["scaled"]),
                 ("Python: OpenCV + onnxruntime", py)]
        for name, r in cells:
            lines.append(f"| {size} | {threads} | {name} | {r['fps']:.2f} | {r['ms_median']:.1f} | {r['model_ms_median']:.1f} | "
                         f"{r['ms_median'] - r['model_ms_median']:.1f} | {r['fps'] / py['fps']:.2f}x |")
    lines.append("")
    lines.append(f"Boxes found (each cell, both sides): {', '.join(str(rows[k][1]['detections']) for k in rows)}.")
    lines += ["", "Run: `scripts/bench-inference` (or `scripts/bench-suite --only 8`)."]
    shutil.rmtree(work, ignore_errors=True)
    return write_table(out_dir, "inference.md", lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    out = os.path.join(ROOT, "bench", "results", "quick" if quick else "")
    os.makedirs(out, exist_ok=True)
    inference(None, out, quick)
