#!/usr/bin/python3
"""Markdown tables for bench/RESULTS.md from a bench/rush JSON, and the run's charts copied
under bench/results/<name>/ (small SVGs, committed; bench/out/ is not).

    python3 bench/rush_report.py bench/out/<stamp>/rush.json [--name NAME]
"""
import argparse
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))


def n(v, unit=""):
    return "–" if v is None else f"{v:,.0f}{unit}"


def ms(v):
    return "–" if v is None else f"{v:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--name", help="directory under bench/results (default: the run's stamp)")
    a = ap.parse_args()
    with open(a.json) as f:
        doc = json.load(f)
    name = a.name or os.path.basename(os.path.dirname(os.path.abspath(a.json)))
    dest = os.path.join(HERE, "results", name)
    os.makedirs(dest, exist_ok=True)

    def keep(path, as_name):
        if path and os.path.exists(path):
            shutil.copy(path, os.path.join(dest, as_name))
            return f"results/{name}/{as_name}"
        return None

    m = doc["machine"]
    print(f"Command: `{' '.join(doc['command'])}` — started {doc['started_at']}  ")
    print(f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}; load average "
          f"(1/5/15 min) at the start {m['loadavg'][0]:.2f} / {m['loadavg'][1]:.2f} / {m['loadavg'][2]:.2f}, "
          f"at the end {m['loadavg_after'][0]:.2f}\n")
    print("| run | load | accepted (201)/s | answered/s | p50 ms | p99 ms (median s) | p99 ms (worst s) "
          "| p99.9 ms (run) | 409 | 400 | 503 | errors | audit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    charts = []
    for r in doc["runs"]:
        pk, t = r.get("peak") or {}, (r.get("loadgen") or {}).get("totals") or {}
        cfg = r["config"]
        load = (f"open {cfg['rate']:,.0f}/s" if cfg["rate"] > 0 else "closed") + f", c={cfg['connections']}"
        if r.get("loadavg_start"):
            load += f", load avg {r['loadavg_start'][0]:.1f}"
        extra = " ".join(f"{k}={v}" for k, v in cfg["env"].items())
        if cfg.get("canned"):
            extra = (extra + " CANNED").strip()
        if cfg.get("ingest_only"):
            extra = (extra + " ROLE=api").strip()
        audit = r.get("audit", {}).get("verdict", "n/a (no DB)" if cfg.get("canned") else
                                       "n/a (no relay/consumer); rows == 201 ids: " +
                                       ("yes" if r.get("ok") else "NO") if cfg.get("ingest_only") else "–")
        if len(audit) > 60:
            audit = audit[:60] + "…"
        print(f"| {r['label']}{' (' + extra + ')' if extra else ''} | {load} | {n(pk.get('accepted_per_s'))} "
              f"| {n(pk.get('answered_per_s'))} | {ms(pk.get('p50_ms_median'))} | {ms(pk.get('p99_ms_median'))} "
              f"| {ms(pk.get('p99_ms_max'))} | {ms(t.get('p999_ms'))} | {n(t.get('409'))} | {n(t.get('400'))} "
              f"| {n(t.get('503'))} | {n(t.get('errors'))} | {audit} |")
        c = keep(r.get("chart"), f"{r['label']}.svg")
        if c:
            charts.append((r["label"], c))
    print()
    print("| run | commit→ack p50 / p99 ms | publish→processed p50 / p99 ms | relay peak/s | "
          "consumer peak/s | all published / processed after the peak's end (s) | max backlog | "
          "max lag | ticketd CPU avg / max % | RSS max MB | PostgreSQL CPU avg % |")
    print("|---|---|---|---:|---:|---|---:|---:|---|---:|---:|")
    for r in doc["runs"]:
        db = r.get("db")
        if not db:
            continue
        smp = [s for s in r.get("samples", []) if "error" not in s]
        busy = [s for s in smp if s.get("loadgen_cpu") is not None] or smp
        mx = lambda k: max((s[k] for s in smp if s.get(k) is not None), default=None)  # noqa: E731
        avg = lambda k: (sum(s.get(k) or 0 for s in busy) / len(busy)) if busy else None  # noqa: E731
        c2a, p2p, d = db["commit_to_ack"], db["publish_to_processed"], db["drain_after_peak"]
        print(f"| {r['label']} | {ms(c2a['p50_ms'])} / {ms(c2a['p99_ms'])} | {ms(p2p['p50_ms'])} / "
              f"{ms(p2p['p99_ms'])} | {n(db['relay_peak_per_s'])} | {n(db['consumer_peak_per_s'])} | "
              f"{d['publish_s']} / {d['process_s']} | {n(mx('backlog'))} | {n(mx('lag'))} | "
              f"{n(avg('ticketd_cpu'))} / {n(mx('ticketd_cpu'))} | {mx('ticketd_rss_mb')} | {n(avg('pg_cpu'))} |")
    print()
    if doc.get("compare"):
        c = doc["compare"]
        a = c["answered_per_s"]
        print(f"Compare (closed loop): group commit on {n(a['group_commit_on'])}/s, off "
              f"{n(a['group_commit_off'])}/s, HTTP ceiling {n(a['http_ceiling'])}/s, ingest only "
              f"(ROLE=api) {n(a.get('ingest_only'))}/s; "
              f"on/off = **{c['on_over_off']}×**, on/ceiling = **{c['on_over_ceiling']}**, "
              f"on/ingest only = **{c.get('on_over_ingest_only')}**\n")
        cc = keep(c.get("chart"), "compare.svg")
        if cc:
            charts.append(("compare", cc))
    if doc.get("crowd"):
        print("| crowd run | CONNECTION_OVERFLOW | accepted/s | × 64 connections | 503/s | p99 201 ms | "
              "p99 503 ms | connect errors (timed out) | transport errors | people in / started | "
              "last in after the peak (s) | person p99 ms | ticketd RSS max MB | WAL bytes/application | audit |")
        print("|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---|")
        for c in doc["crowd"]["runs"]:
            audit = c.get("audit") or "–"
            print(f"| {c['label']} | {c['overflow'] if c['connections'] > 64 else '–'} | "
                  f"{n(c['accepted_per_s'])} | {c['over_64']} | {n(c['s503_per_s'])} | "
                  f"{ms(c['p99_201_ms'])} | {ms(c['p99_503_ms'])} | {n(c['connect_errors'])} "
                  f"({n(c['connect_timeouts'])}) | {n(c['transport_errors'])} | {n(c['persons_in'])} / "
                  f"{n(c['persons'])} | {c['time_all_in_s']} | {ms(c['person_p99_ms'])} | "
                  f"{c['ticketd_rss_mb_max']} | {n(c.get('wal_bytes_per_application'))} | "
                  f"{audit[:60] + '…' if len(audit) > 60 else audit} |")
        print()
    if doc.get("sweep"):
        s = doc["sweep"]
        print("| offered/s | accepted/s | answered/s | p50 ms | p99 ms (median s) | p99 ms (worst s) | "
              "commit→ack p99 ms | publish→processed p99 ms | audit ok |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for st in s["steps"]:
            print(f"| {n(st['rate'])} | {n(st['accepted_per_s'])} | {n(st['answered_per_s'])} | "
                  f"{ms(st['p50_ms_median'])} | {ms(st['p99_ms_median'])} | {ms(st['p99_ms_max'])} | "
                  f"{ms(st['commit_to_ack_p99_ms'])} | {ms(st['publish_to_processed_p99_ms'])} | "
                  f"{'yes' if st['ok'] else 'NO'} |")
        print(f"\nKnee: {n(s['knee_rate'])} offered/s ({n(s['knee_accepted_per_s'])} accepted/s); "
              f"max accepted {n(s['max_accepted_per_s'])}/s; worst p99 at or below the knee "
              f"{ms(s['p99_below_knee_ms_max'])} ms\n")
        sc = keep(s.get("chart"), "sweep.svg")
        if sc:
            charts.append(("sweep", sc))
    if doc.get("targets"):
        for k, v in doc["targets"].items():
            print(f"- {k}: {'met' if v else '**missed**'}")
        print()
    for label, path in charts:
        print(f"- [{label}]({path})")


if __name__ == "__main__":
    main()
