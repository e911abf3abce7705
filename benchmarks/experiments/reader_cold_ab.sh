#!/bin/bash
# Two builds of memkernels_reader_cold (the reading layer from DRAM beside plain reads of its
# bytes) in turns, ROUNDS rounds a size, the order swapped halfway (tool_ab.sh, one size at a
# time, 400 calls a run). Compare the "x the steps'" ratios, which are timed in the same minute
# as the layer; the layer's own time moves with the machine's.
#   benchmarks/experiments/reader_cold_ab.sh NAME_A BIN_A NAME_B BIN_B ROUNDS SLOTS...
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 NAME_A BIN_A NAME_B BIN_B ROUNDS SLOTS..." >&2
  exit 2
fi
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 rounds=$5
shift 5
here=$(dirname "$0")
for slots in "$@"; do
  "$here/tool_ab.sh" "$name_a" "$bin_a" "$name_b" "$bin_b" "$rounds" "$slots" 400
done
