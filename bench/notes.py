"""The prose of docs/BENCHMARKS.md that figures cannot say: method and findings."""

from __future__ import annotations

METHOD = """
## How to run

```console
make bench                                   # everything, about 15 minutes on 2 cores
.venv/bin/python -m bench.run_all --quick    # every bench at smoke size, a few minutes
.venv/bin/python -m bench.run_all --only live replay
.venv/bin/python -m bench.trainer --help     # each bench alone, with its size flags
bench/gpu.sh                                 # on a machine with an NVIDIA GPU
```

PostgreSQL and RabbitMQ come from `BENCH_DATABASE_URL` and `BENCH_BROKER_URL` (by default
the same local servers as the tests); every bench works in a schema, exchange and queue of
its own and drops them afterwards. The JSON figures land in `var/bench/`. Benchmarks are
not tests: nothing here is asserted in the test suite.

Each bench alternates system and bare runs (A B B A ...) so that a change in the
machine's load hits both sides, and reports the best and the median of each side; the
verdict uses the best (the run least disturbed by other processes). Latencies pool
every request of every round. The trainer is judged on CPU time (samples per CPU second
of the training process, all threads): on this shared 2-core machine the wall time of
the same run varied by 2x from one run to the next, its CPU time much less.
"""

FINDINGS = """
## What the figures showed, and what was done

Findings are filled in from the profiling of this run; see the sections above for the
figures they refer to.
"""
