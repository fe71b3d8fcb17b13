"""Alternating rounds of the producer sweep's clients on chosen cells, for cells whose sweep
medians sit inside the machine's run-to-run spread (the 2 MB ones): the windowed framelink
client (as the agent's drain drives it, window = K x max(batch.size, largest record)) and
Python confluent-kafka, one after the other in every round, each on a fresh topic, with the
sweep's own client code (bench/suite.py). Prints each round and, per cell, the medians and the
median of the per-round ratios (rounds are paired in time, so the ratio of a round is less
exposed to the machine's drift than the ratio of medians).

  python3 bench/window_rounds.py --rounds 8 --batch 2097152 --linger 0 5 [--factors 4 5]

Needs the release bench producer (`cargo build --release -p framelink-bench --bin
framelink-bench-producer`), a broker (`scripts/kafka up`) and confluent-kafka.
"""
import argparse
import os
import statistics
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402
from benchlib import ROOT, delete_topics  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:19092")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--count", type=int, default=2000, help="records per run (the sweep's 2000)")
    ap.add_argument("--batch", type=int, default=2097152)
    ap.add_argument("--linger", type=int, nargs="+", default=[0, 5])
    ap.add_argument("--factors", type=int, nargs="+", default=[4], help="windows of K requests' worth (the sweep's and the agent's rule: 4)")
    a = ap.parse_args()
    files = suite.frames(os.path.join(ROOT, "target", "bench", "frames"), 1920, 1080)
    largest = max(os.path.getsize(f) for f in files)
    names = [f"window {k}x" for k in a.factors] + ["Python"]
    res = {}
    for linger in a.linger:
        s = {"batch": a.batch, "linger": linger, "compression": "none"}
        for r in range(a.rounds):
            for k, name in zip(a.factors + [None], names):
                topic = f"bench-window-{uuid.uuid4().hex[:10]}"
                if k is None:
                    out = suite.run_python(a.bootstrap, topic, a.count, s, files)
                else:
                    suite.window_bytes = lambda s, f, k=k: k * max(s["batch"], largest)
                    out = suite.run_framelink(a.bootstrap, topic, a.count, s, files, window=True)
                delete_topics(a.bootstrap, [topic])
                if out["failed"] or out["acknowledged"] != a.count:
                    raise SystemExit(f"{name}, linger {linger}: {out['failed']} failed, {out['acknowledged']} of {a.count} acknowledged")
                res.setdefault((linger, name), []).append(out["records_per_s"])
                print(f"linger {linger} round {r + 1} {name}: {out['records_per_s']:.0f} records/s", flush=True)
    print(f"\n| batch.size | linger.ms | client | records/s median | rounds | median of per-round ratios vs Python |\n| ---: | ---: | --- | ---: | --- | ---: |")
    for linger in a.linger:
        py = res[(linger, "Python")]
        for name in names:
            runs = res[(linger, name)]
            ratio = statistics.median(x / p for x, p in zip(runs, py))
            print(f"| {a.batch // 1024} KB | {linger} | {name} | {statistics.median(runs):.0f} | {' '.join(str(round(x)) for x in runs)} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
