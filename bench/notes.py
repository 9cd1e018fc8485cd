"""The prose of docs/BENCHMARKS.md that figures cannot say: method and findings."""

from __future__ import annotations

METHOD = """
## How to run

```console
make bench                                   # everything, 10-15 minutes on 2 cores
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

The run above was made from a clean export of the committed tree while other engineers
edited theirs and ran their tests on the same two cores (see the load averages).
Profiles were taken with py-spy on the same machine; the percentages below are shares
of a process's busy samples. A later run on a quieter or busier machine moves the
ratios a little.

**1. Trainer (missed by a few per cent on the whole job; steps alone are about 0.98).**
The training step is the same code path on both sides: backward ~47 % and forward ~17 %
of the trainer's samples, AdamW ~6 %. `StoreHooks.check` and the step telemetry do not
show in the profile (below 0.3 %): the per-step control is a clock read and a flag,
confirmed against the store every 2 s. What the job does beyond the bare loop is per
epoch: validation with distance metrics (~3 % of samples vs ~2.5 % for the bare loop's
loss-only pass), a checkpoint (model, AdamW state, RNG; 13-40 MB written to a temp
file, fsynced, hashed and renamed: 0.1-0.2 s), and two appends to the store: about 2 %
with 51 steps an epoch, less as epochs grow. The other ~2 % is in the steps (the
steps-only ratio): not the control check, but the per-step accuracy metric (a haversine
over the batch), the schedule and the `.tolist()` of three numbers; not separated
further. Not changed: the checkpoint could be written by a background thread from a
copy of the state, but a `Paused` event must only follow a durable checkpoint, so that
change belongs with the trainer's owners. Found on the way: with OpenMP's default
busy-waiting, the same bare run measured anywhere from 14 to 158 samples/s depending on
the other processes on the two cores; `OMP_WAIT_POLICY=PASSIVE` (used for both sides
here) made runs repeatable within 3 %. Worth setting for trainers on shared CPU hosts.

**2. Commands (missed).** `save()` itself is the same on both sides, but in the api
the request threads (up to 40 of anyio's) and the event loop share one GIL with the
thread that holds eventsourcing's insert lock (every insert takes a table lock,
LIBRARY-NOTES): ~75 % of the api's samples wait in `insert_events` (`Pipeline.sync`),
so the lock is held longer while its holder waits for the GIL, and writers queue (p99
in seconds). The threads of the bare baseline do nothing else, so its holder runs at
once. A small semaphore around the api's saves (so at most a few request threads
contend while one holds the lock) is the likely fix; left to the api's owners. The 50
httpx clients also run on the same two cores.

**3. Queries (missed).** The api's own work per page is cheaper than the bare route's:
building and serialising 50 `Job` models took ~6 ms against ~15 ms for FastAPI's
`jsonable_encoder` over raw rows. The time goes to PostgreSQL round trips: ~50 % of the
api's samples wait in psycopg. The api makes five (the pool's `check_connection`, BEGIN,
COUNT, page, COMMIT), the bare route four (no check); on loaded cores every round trip
costs a context switch into PostgreSQL, and the check alone is ~8.5 % of the samples.
Options, left to the owners of the outage handling that added the check: check only
connections idle for a while, or fetch the page and `COUNT(*) OVER ()` in one
statement without an explicit transaction (one round trip instead of four). The 5,000
row metrics page is dominated by the same round trips plus validating 5,000 rows twice
(the route builds `MetricRow`s, FastAPI validates them again against the response
model).

**4. Live (met).** The hub writes each socket from its own bounded queue, so the 1,000
sends overlap; the bare route's `gather` over 1,000 `send_text` calls has the larger
tail. The system's median is higher: its path has four hops (store, NOTIFY, projector
transaction, RabbitMQ confirm) before the first socket is written.

**5. Replay (missed; improved ~30x).** The rebuild projected one event per transaction:
five to six round trips an event (pool check, BEGIN, position update, job upsert,
metric upsert, COMMIT), about 100 events/s under load. `JobsProjection.process_batch`
(used by `rebuild`) now applies a page of 500 events in one transaction, writes each
job's row once per page and the rows with `executemany`, with the position check that
keeps it exactly-once (tests: `tests/integration/test_projection_batch.py`): about
11,000 events/s in this run. The goal of 0.5 of the raw read is out of reach for this
design: decoding a notification into its domain event alone (eventsourcing's mapper
and JSON transcoder, ~25-30 us) is slower than reading it (~10-20 us), so read + decode
caps any Python rebuild near 0.45 of the raw read; the rest is writing rows
(~100-300 us a row through `executemany` on a loaded PostgreSQL). Next step: COPY into
the fresh tables. The live projector still projects one event per transaction (it
publishes each event after projecting it); batching it the same way would raise its
catch-up rate.

**7. Load test (met: no errors, nothing lost).** The latencies are those of a saturated
2-core machine: the 200 clients, the api, the projector, PostgreSQL and RabbitMQ share
the two cores with other engineers' test runs. Submits are the slowest kind for the
reason in 2.

**8. GPU.** `bench/gpu.sh` has not run on a GPU: no session so far had one. Its CPU
smoke run (`bench/gpu.sh --cpu`) exercises the same code on convnext_atto; its ratio is
noise (18 steps a side on loaded cores) and says nothing about a GPU. The trainer's
loop syncs the device once a step (`.tolist()` of loss, norm and hits), as the bare loop
does with `loss.item()`; on a GPU that sync, and the per-step host-to-device copies of
each batch (shown as "data share"), are what to look at first if the ratio misses.
"""
