"""Figure 5: events/s rebuilding the read tables from the store (the projection of
`heimdall replay`, into fresh tables) vs reading the same notifications raw."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    DATABASE_URL,
    emit,
    fresh_schema,
    median,
    own_peak_rss_mb,
    parser,
    ratio,
    workdir,
)
from bench.populate import add_jobs, add_long_job
from services.projector.replay import BATCH, fresh_store, rebuild
from shared.application import TrainingJobs
from shared.bootstrap import build_app
from shared.settings import Settings

GOAL = 0.5


def read_raw(app: TrainingJobs, up_to: int) -> int:
    """Every notification up to `up_to`, in the same pages as the rebuild, and nothing else."""
    after, count = 0, 0
    while after < up_to:
        batch = app.recorder.select_notifications(
            after, BATCH, stop=up_to, inclusive_of_start=False
        )
        if not batch:
            break
        after, count = batch[-1].id, count + len(batch)
    return count


def read_and_decode(app: TrainingJobs, up_to: int) -> int:
    """The same, decoding each into its domain event (what any consumer must at least do)."""
    after, count = 0, 0
    while after < up_to:
        batch = app.recorder.select_notifications(
            after, BATCH, stop=up_to, inclusive_of_start=False
        )
        if not batch:
            break
        for notification in batch:
            app.mapper.to_domain_event(notification)
        after, count = batch[-1].id, count + len(batch)
    return count


def timed(work: str, app: TrainingJobs, settings: Settings, up_to: int) -> float:
    """Events per second of one pass."""
    if work == "rebuild":
        with fresh_store(settings) as fresh:
            started = time.perf_counter()
            events = rebuild(app, fresh, up_to)
            return events / (time.perf_counter() - started)
    reader = read_raw if work == "raw" else read_and_decode
    started = time.perf_counter()
    events = reader(app, up_to)
    return events / (time.perf_counter() - started)


def main(jobs: int, epochs: int, rounds: int, out: Path | None) -> None:
    with fresh_schema("bench_replay") as schema, workdir() as tmp:
        settings = Settings(database_url=DATABASE_URL, database_schema=schema, data_dir=tmp)
        app = build_app(settings)
        add_jobs(app, jobs)
        add_long_job(app, epochs)
        up_to = app.recorder.max_notification_id() or 0
        rates: dict[str, list[float]] = {"raw": [], "decoded": [], "rebuild": []}
        for r in range(rounds):
            order = ("raw", "decoded", "rebuild") if r % 2 == 0 else ("rebuild", "decoded", "raw")
            for work in order:
                rates[work].append(timed(work, app, settings, up_to))
                print(f"{work}: {rates[work][-1]:.0f} events/s", flush=True)
        app.close()
    best = {k: max(v) for k, v in rates.items()}
    emit(
        {
            "figure": "replay",
            "events": up_to,
            "jobs": jobs + 1,
            "epochs": epochs,
            "rounds": rounds,
            "rebuild_per_s": {"best": best["rebuild"], "median": median(rates["rebuild"])},
            "raw_per_s": {"best": best["raw"], "median": median(rates["raw"])},
            "decoded_per_s": {"best": best["decoded"], "median": median(rates["decoded"])},
            "ratio_best": ratio(best["rebuild"], best["raw"]),
            "ratio_median": ratio(median(rates["rebuild"]), median(rates["raw"])),
            "ratio_vs_decoded": ratio(best["rebuild"], best["decoded"]),
            "peak_rss_mb": own_peak_rss_mb(),
            "goal": GOAL,
        },
        out,
    )


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=5_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.jobs, args.epochs, args.rounds = 1000, 500, 1
    main(args.jobs, args.epochs, args.rounds, args.json)
