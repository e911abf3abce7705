#!/bin/bash
# Two builds of one C++ tool (csrc/tools) in turns, ROUNDS rounds, the order swapped halfway:
# each line the tool prints, prefixed by its build's name and the round. For A/B runs of a
# kernel change on a machine whose speed moves from minute to minute: compare the pairs, and
# the ratios a tool times in the same minute, not one build's times against another's hour.
#   benchmarks/experiments/tool_ab.sh NAME_A BIN_A NAME_B BIN_B ROUNDS [TOOL_ARGS...]
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 NAME_A BIN_A NAME_B BIN_B ROUNDS [TOOL_ARGS...]" >&2
  exit 2
fi
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 rounds=$5
shift 5
for i in $(seq 1 "$rounds"); do
  if [ "$i" -le $((rounds / 2)) ]; then order="a b"; else order="b a"; fi
  for which in $order; do
    if [ "$which" = a ]; then name=$name_a bin=$bin_a; else name=$name_b bin=$bin_b; fi
    "$bin" "$@" | sed "s/^/$name round $i: /"
  done
done
