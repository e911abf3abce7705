#!/bin/bash
# Two builds of memkernels_reader_cold (the reading layer from DRAM beside plain reads of its
# bytes) in turns, ROUNDS rounds a size, the order swapped halfway: each printed line is one
# call of the tool prefixed by its build's name. Compare the "x the steps'" ratios, which are
# timed in the same minute as the layer; the layer's own time moves with the machine's.
#   benchmarks/experiments/reader_cold_ab.sh NAME_A BIN_A NAME_B BIN_B ROUNDS SLOTS...
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 NAME_A BIN_A NAME_B BIN_B ROUNDS SLOTS..." >&2
  exit 2
fi
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 rounds=$5
shift 5
for slots in "$@"; do
  for i in $(seq 1 "$rounds"); do
    if [ "$i" -le $((rounds / 2)) ]; then order="a b"; else order="b a"; fi
    for which in $order; do
      if [ "$which" = a ]; then name=$name_a bin=$bin_a; else name=$name_b bin=$bin_b; fi
      echo "$name $("$bin" "$slots" 400 | head -1)"
    done
  done
done
