#!/usr/bin/python3
"""Medians of sidecast-bench JSON result lines, one markdown table with the
ratios to the Node socket.io peer (label "node").

    bench/summarize.py RESULTS.jsonl [--baseline node]

Each input line is one sidecast-bench result with an extra "case" and "run"
(bench/run adds them). Lines with "error" are counted and shown as failed
runs. Every figure printed is the median over the runs of that case and
server. A ratio to Node is taken within each run (this server's figure over
Node's in the same run: the host's slow spells move both, or one of them for
that run only), and the table shows the median of those; a second table
lists every run's throughput, CPU and p50 ratios. Without a run number on the
lines, ratios are taken between the medians.
"""
import argparse
import json
import statistics
import sys
from collections import OrderedDict, defaultdict

# case -> (throughput key, CPU-per-message key, what the throughput counts)
CASES = OrderedDict([
    ("fanout", ("deliveries_per_s", "server_cpu_us_per_delivery", "deliveries/s")),
    ("fanout-deep", ("deliveries_per_s", "server_cpu_us_per_delivery", "deliveries/s")),
    ("fanout-rate", ("deliveries_per_s", "server_cpu_us_per_delivery", "deliveries/s")),
    ("echo", ("acks_per_s", "server_cpu_us_per_ack", "acks/s")),
    ("echo1", ("acks_per_s", "server_cpu_us_per_ack", "acks/s")),
    ("polling", ("acks_per_s", "server_cpu_us_per_ack", "acks/s")),
    ("connections", ("connects_per_s", "server_cpu_us_per_connect", "connects/s")),
])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def med(rs, key):
    """The median of one field over result lines."""
    return median([r.get(key) for r in rs])


def fmt(v, digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{v:,.0f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}×"


def paired(rs, base, key):
    """Each run's ratio rs[key] / base[key], in run order, over the runs both have."""
    by_run = {r.get("run"): r.get(key) for r in base}
    out = []
    for r in sorted(rs, key=lambda r: r.get("run") or 0):
        b = by_run.get(r.get("run"))
        if r.get("run") is not None and r.get(key) is not None and b:
            out.append(r[key] / b)
    return out


def ratio_of(rs, base, key):
    """The median of the per-run ratios; the ratio of the medians without run numbers."""
    runs = paired(rs, base, key)
    if runs:
        return f"{statistics.median(runs):.2f}×"
    return ratio(med(rs, key), med(base, key))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--baseline", default="node")
    args = ap.parse_args()

    rows = defaultdict(list)   # (case, label) -> [result]
    errors = defaultdict(int)
    labels = []
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            key = (r.get("case", r.get("scenario")), r.get("label"))
            if r.get("label") not in labels:
                labels.append(r.get("label"))
            if "error" in r:
                errors[key] += 1
            else:
                rows[key].append(r)

    print("| case | server | runs | rate | unit | srv CPU µs/msg | p50 µs | p99 µs | p99.9 µs | p99 read µs | loss | "
          "KB/conn | alive | gen CPU % | rate ÷ Node | CPU/msg ÷ Node | p99 ÷ Node | p99 read ÷ Node | "
          "KB/conn ÷ Node |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case, (rate_key, cpu_key, unit) in CASES.items():
        base = rows.get((case, args.baseline), [])
        for label in labels:
            rs = rows.get((case, label), [])
            n_err = errors.get((case, label), 0)
            if not rs and not n_err:
                continue
            if not rs:
                print(f"| {case} | {label} | 0/{n_err} failed | | | | | | | | | | | | | | | | |")
                continue
            rate, cpu = med(rs, rate_key), med(rs, cpu_key)
            p50, p99, p999 = med(rs, "p50_us"), med(rs, "p99_us"), med(rs, "p999_us")
            read = med(rs, "read_p99_us")
            if case == "connections":
                loss = med(rs, "dropped_in_hold")
                kb = med(rs, "rss_per_conn_bytes")
                kb = kb / 1024 if kb is not None else None
                alive = f'{fmt(med(rs, "verified"))}/{fmt(med(rs, "connections"))}'
                # The generator's CPU while connecting, % of one core.
                gen = median([r["connects_per_s"] * r["gen_cpu_us_per_connect"] / 1e4 for r in rs
                              if r.get("connects_per_s") and r.get("gen_cpu_us_per_connect")])
            else:
                loss = med(rs, "loss")
                kb, alive = None, ""
                gen = med(rs, "gen_cpu_pct")
            runs = f"{len(rs)}" + (f" (+{n_err} failed)" if n_err else "")
            print(f"| {case} | {label} | {runs} | {fmt(rate)} | {unit} | {fmt(cpu, 2)} | {fmt(p50, 1)} | "
                  f"{fmt(p99, 1)} | {fmt(p999, 1)} | {fmt(read, 1)} | {fmt(loss)} | {fmt(kb, 1)} | {alive} | "
                  f"{fmt(gen, 1)} | "
                  + " | ".join(ratio_of(rs, base, k) for k in (rate_key, cpu_key, "p99_us", "read_p99_us",
                                                                 "rss_per_conn_bytes")) + " |")

    lines = []
    for case, (rate_key, cpu_key, _) in CASES.items():
        base = rows.get((case, args.baseline), [])
        for label in labels:
            if label == args.baseline:
                continue
            rs = rows.get((case, label), [])
            rates, cpus, p50s = (paired(rs, base, k) for k in (rate_key, cpu_key, "p50_us"))
            if len(rates) > 1 or len(cpus) > 1:
                lines.append(f"| {case} | {label} | {' / '.join(f'{v:.2f}' for v in rates)} | "
                             f"{' / '.join(f'{v:.2f}' for v in cpus)} | {' / '.join(f'{v:.2f}' for v in p50s)} |")
    if lines:
        print()
        print(f"Each run's ratio to {args.baseline} (same run), in run order:")
        print()
        print("| case | server | rate ÷ Node | CPU/msg ÷ Node | p50 ÷ Node |")
        print("|---|---|---|---|---|")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
