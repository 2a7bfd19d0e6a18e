# Shared by the shell benchmarks (sourced, not run; bench/run skips it).

# bench_line NAME VALUE UNIT BASELINE_NAME BASELINE RATIO TARGET MET: the machine-readable line
# bench/run collects. BASELINE and RATIO may be "null"; MET is "true" or "false". Names and
# targets must not contain double quotes or backslashes (they go into JSON as they are).
bench_line() {
  printf 'BENCH {"name": "%s", "value": %s, "unit": "%s", "baseline_name": "%s", "baseline": %s, "ratio": %s, "target": "%s", "met": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8"
}

# Median of the numbers given as arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Nanoseconds since the epoch.
now_ns() { date +%s%N; }

# Seconds (3 decimals) from nanoseconds.
seconds() { awk -v ns="$1" 'BEGIN { printf "%.3f", ns / 1e9 }'; }
