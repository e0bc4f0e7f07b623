#!/usr/bin/env bash
# Instructions per row of `kohort-batch run` (user space, all threads), counted by
# callgrind: a 10,000-row run minus a 2,000-row run, over 8,000 rows, so start-up does
# not count. Unlike time, the count barely moves on a busy machine, so it tells small
# changes apart (see BENCHMARKS.md). Needs valgrind; takes about a minute per binary.
#   usage: benches/instructions.sh [BINARY...]   (default: target/release/kohort-batch)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 2; }
[ $# -gt 0 ] || set -- target/release/kohort-batch
out=bench-out/instructions
mkdir -p "$out"
for n in 2000 10000; do
  [ -f "$out/rows-$n.csv" ] || {
    echo "customerId,orderId,metadata.campaign"
    for i in $(seq 1 "$n"); do printf 'cus_%07d,ord_%07d,spring\n' "$i" "$i"; done
  } > "$out/rows-$n.csv"
done
port=$((20000 + RANDOM % 20000))
"$1" sandbox --listen "127.0.0.1:$port" >/dev/null 2>&1 &
sandbox=$!
trap 'kill $sandbox 2>/dev/null' EXIT
sleep 0.5
for bin in "$@"; do
  counts=()
  for n in 2000 10000; do
    rm -f "$out/i.db" "$out/i.db-wal" "$out/i.db-shm"
    KOHORTPAY_API_KEY=sk_test_instructions valgrind --tool=callgrind \
      --callgrind-out-file="$out/callgrind.$(basename "$bin").$n" \
      "$bin" run --db "$out/i.db" --csv "$out/rows-$n.csv" --api-base "http://127.0.0.1:$port" \
      --rate 0 --concurrency 64 --precheck ambiguous >/dev/null 2>"$out/valgrind.err"
    counts+=("$(grep -o 'Collected : [0-9]*' "$out/valgrind.err" | grep -o '[0-9]*$')")
  done
  echo "$bin: $(( (counts[1] - counts[0]) / 8000 )) instructions per row"
done
