#!/usr/bin/env bash
# Report bench (issue 17): time and peak memory of `ticketd report` over N applications of one
# show, on the data audit_bench.sh builds (a throwaway PostgreSQL, a standalone kafka-mock,
# every row published, processed and committed). Two runs per N; the second has warm caches.
#
#   bench/report_bench.sh [N ...]          default: 100000
#
# Prints one line per run (wall, peak RSS, the summary line with the evidence SHA-256: the
# two runs must print the same hash) and the size of the HTML written.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d /tmp/ticketd-report-bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
BENCH_COMMAND="report --event-id bench-2026 --out $OUT/report.html" "$ROOT/bench/audit_bench.sh" "$@"
printf 'report html: %d bytes\n' "$(stat -c %s "$OUT/report.html")"
