"""The benchmark harness, shipped with the package so any install can run it:

    python -m memkernels.apps.bench            # every op and backend on this device
    python -m memkernels.apps.bench.report R   # markdown table + PNG from results R

shapes.py is the one registry of sizes; cases.py builds each implementation
(memkernels backends and baselines); timing.py measures times and the
machine's limits; run.py prints and records the table.
"""
