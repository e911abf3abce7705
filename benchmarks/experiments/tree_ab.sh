#!/bin/bash
# Two source trees (each with its extension built in place) in turns, ROUNDS rounds, the
# order swapped every round: a Python script of this folder run from each tree, one process
# a run, each line it prints prefixed by its tree's name and the round. The A/B of a kernel
# change at the Python level (tool_ab.sh is the C++ tools' twin): compare the pairs, not one
# tree's times against another's hour.
#   benchmarks/experiments/tree_ab.sh NAME_A TREE_A NAME_B TREE_B ROUNDS SCRIPT [ARGS...]
#   e.g. ... v49 /tmp/wt_v49 v50 /tmp/wt_v50 10 train_step_ab.py write
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 NAME_A TREE_A NAME_B TREE_B ROUNDS SCRIPT [ARGS...]" >&2
  exit 2
fi
name_a=$1 tree_a=$2 name_b=$3 tree_b=$4 rounds=$5 script=$6
shift 6
for i in $(seq 1 "$rounds"); do
  if [ $((i % 2)) = 1 ]; then order="a b"; else order="b a"; fi
  for which in $order; do
    if [ "$which" = a ]; then name=$name_a tree=$tree_a; else name=$name_b tree=$tree_b; fi
    (cd "$tree" && PYTHONPATH="$tree" python "benchmarks/experiments/$script" "$@") |
      sed "s/^/$name round $i: /"
  done
done
