"""Renders docs/BENCHMARKS.md from the figures `bench.run_all` collected."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from bench.notes import FINDINGS, METHOD

Figures = dict[str, Any]


def render(report: Figures) -> str:
    b = report["benches"]
    quick = " --quick" if report["quick"] else ""
    parts = [
        "# Benchmarks\n",
        f"Written by `make bench` (`python -m bench.run_all{quick}`) on {report['started']},"
        f" in {report['minutes']} minutes. Every figure is the system against a bare baseline"
        " doing the same work, **measured side by side in the same run**: the ratio is the"
        " point; absolute numbers depend on the machine and on what else ran on it.\n",
        _machine(report),
        "## Summary\n",
        _summary(b),
        METHOD,
    ]
    for name, section in SECTIONS.items():
        if name in b:
            parts.append(_failed(name, b[name]) if "error" in b[name] else section(b[name]))
    parts += [_memory(b), FINDINGS]
    return "\n".join(parts).rstrip() + "\n"


def num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _machine(report: Figures) -> str:
    m = report["machine"]
    rows = [
        ["CPU", f"{m['cpu']}, {m['cores']} cores"],
        ["RAM", f"{m['ram_gib']} GiB"],
        ["OS", m["os"]],
        *([name, version] for name, version in report["versions"].items()),
    ]
    return "## Machine and versions\n\n" + table(["", ""], rows)


def _failed(name: str, f: Figures) -> str:
    return f"## {name}\n\n**Failed** after {f['seconds']} s:\n\n```\n{f['error']}\n```\n"


def _summary(b: Figures) -> str:
    rows = []
    for name, row in SUMMARY.items():
        if name not in b:
            continue
        f = b[name]
        if "error" in f:
            rows.append([name, "", "", "", "", "**failed** (see below)"])
        else:
            rows += row(f)
    loads = ", ".join(
        f"{n} {f['load_before']} → {f['load_after']}"
        + (f" (at {f['measured_at'][11:16]} UTC)" if "measured_at" in f else "")
        for n, f in b.items()
    )
    return (
        table(["figure", "system", "bare", "ratio (best / median)", "goal", ""], rows)
        + f"\nLoad average (1 min) before → after each bench: {loads}. The machine has 2"
        " cores and is shared with other engineers' test runs. `--only` reruns keep the"
        " other benches' last figures.\n"
    )


def _ratios(f: Figures, digits: int = 2) -> str:
    return f"{num(f['ratio_best'], digits)} / {num(f['ratio_median'], digits)}"


def _sum_trainer(f: Figures) -> list[list[str]]:
    s, b = num(f["system"]["cpu_best"], 1), num(f["bare"]["cpu_best"], 1)
    ratios = f"{num(f['ratio_cpu_best'], 3)} (wall: {_ratios(f, 3)})"
    return [["1 trainer samples per CPU second", s, b, ratios, "≥ 0.98", met(_ok_trainer(f))]]


def _ok_trainer(f: Figures) -> bool:
    return bool(f["ratio_cpu_best"] >= 0.98)


def _sum_commands(f: Figures) -> list[list[str]]:
    s, b = num(f["system"]["best_per_s"]), num(f["bare"]["best_per_s"])
    ok = f["ratio_best"] >= 0.5
    return [["2 POST /jobs per s, 50 clients", s, b, _ratios(f), "≥ 0.5", met(ok)]]


def _ok_query(q: Figures) -> bool:
    return bool(q["ratio_best"] >= 0.7 and q["p99_ratio"] <= 1.5)


def _sum_queries(f: Figures) -> list[list[str]]:
    rows = []
    for key, label in QUERY_LABELS.items():
        q = f[key]
        s, b = num(q["system"]["best_per_s"]), num(q["bare"]["best_per_s"])
        goal = f"≥ 0.7; p99 ≤ 1.5x (is {num(q['p99_ratio'], 2)}x)"
        rows.append([f"3 {label} per s", s, b, _ratios(q), goal, met(_ok_query(q))])
    return rows


def _ok_live(f: Figures) -> bool:
    return bool(f["p99_ratio"] <= 1.0 and not f["system"]["missing"])


def _sum_live(f: Figures) -> list[list[str]]:
    s, b = num(f["system"]["p99_ms"]), num(f["bare"]["p99_ms"])
    label = f"4 live p99 ms, {f['clients']:,} WebSockets"
    return [[label, s, b, f"{num(f['p99_ratio'], 2)} (p99)", "≤ 1.0", met(_ok_live(f))]]


def _sum_replay(f: Figures) -> list[list[str]]:
    s, b = num(f["rebuild_per_s"]["best"]), num(f["raw_per_s"]["best"])
    ok = f["ratio_best"] >= 0.5
    return [["5 replay events/s", s, b, _ratios(f, 3), "≥ 0.5", met(ok)]]


def _ok_load(f: Figures) -> bool:
    return bool(f["unexpected_errors"] == 0 and f["every_accepted_submit_listed"])


def _sum_load(f: Figures) -> list[list[str]]:
    label = f"7 load test, {f['clients']} clients, {num(f['duration_s'])} s"
    result = f"{f['requests']:,} requests, {f['unexpected_errors']} errors"
    return [[label, result, "", "", "0 errors, nothing lost", met(_ok_load(f))]]


def _sum_gpu(f: Figures) -> list[list[str]]:
    s, b = num(f["system"]["samples_per_second"], 1), num(f["bare"]["samples_per_second"], 1)
    on_gpu = f["device"] != "cpu"
    verdict = met(f["ratio"] >= 0.95) if on_gpu else "not run on a GPU yet (CPU smoke run)"
    return [[f"8 GPU ({f['model']} on {f['device']})", s, b, num(f["ratio"], 2), "≥ 0.95", verdict]]


def _sum_ml(f: Figures) -> list[list[str]]:
    job, knn = f["rows"]["job_last_epoch"], f["rows"]["knn"]
    ok = f["last_over_knn_p50"] <= ML_GOAL
    return [
        [
            "9 default job p50 (last epoch) vs kNN on receiver powers, km",
            num(job["p50"], 1),
            num(knn["p50"], 1),
            num(f["last_over_knn_p50"], 2),
            f"≤ {ML_GOAL}",
            met(ok),
        ]
    ]


ML_GOAL = 1.3
ML_LABELS = {
    "centre": "predict the region's centre",
    "centroid": "power-weighted centroid of the receivers",
    "knn": "kNN (k = 5) on the per-receiver powers",
    "job_last_epoch": "default job, last epoch",
    "job_shipped": "default job, shipped model.pt (best epoch)",
}


def _ml(f: Figures) -> str:
    c = f["config"]
    d = c["dataset"]
    rows = [
        [ML_LABELS[name]]
        + [num(r[q], 1) for q in ("p50", "p68", "p95")]
        + [num(r.get("inside_68"), 2) if "inside_68" in r else "", num(r["seconds"], 1)]
        for name, r in f["rows"].items()
    ]
    head = ["method, same validation split", "p50 km", "p68 km", "p95 km", "inside 68 %", "s"]
    return (
        "## 9. What the default job learns (`bench/ml.py`)\n\n"
        f"The default job ({c['model_architecture']}, {c['epochs']} epochs, {d['samples']}"
        f" synthetic samples of {d['receivers']} receivers x {d['n_mels']} x {d['frames']}) on"
        " the CPU, against three baselines on its own validation split (README: Baselines)."
        " The job's seconds are its whole wall time; a baseline's, all three together.\n\n"
        + table(head, rows)
    )


def _latencies(rows: list[tuple[str, Figures]]) -> str:
    head = ["", "per s (best)", "per s (median)", "p50 ms", "p99 ms", "max ms"]
    body = [
        [label, num(s["best_per_s"]), num(s["median_per_s"])]
        + [num(s[k], 1) for k in ("p50_ms", "p99_ms", "max_ms")]
        for label, s in rows
    ]
    return table(head, body)


def _trainer(f: Figures) -> str:
    c = f["config"]
    shape = "x".join(str(d) for d in c["input"])
    rows = [
        [
            side,
            num(f[side]["cpu_best"], 1),
            ", ".join(num(x, 1) for x in f[side]["cpu_all"]),
            num(f[side]["best"], 1),
            ", ".join(num(x, 1) for x in f[side]["all"]),
            num(f[side]["steps_best"], 1),
            num(f[side]["peak_rss_mb"]),
        ]
        for side in ("system", "bare")
    ]
    head = ["", "per CPU s (best)", "runs", "per wall s (best)", "runs", "steps only", "RSS MiB"]
    return (
        "## 1. Trainer: samples/s through the whole system vs a bare PyTorch loop\n\n"
        f"{c['model']}, batch {c['batch_size']}, {c['epochs']} epochs, {c['samples']:,}"
        f" training samples of {shape}, CPU, fp32; {f['rounds']} runs a side, alternating, each"
        " in a fresh process. System: submitted to a PostgreSQL store, projected, claimed and"
        " run by the trainer service (`Trainer.run_next`: `run_training` with the real"
        " `StoreHooks`, a control check after every step, epoch events, a checkpoint per"
        " epoch, the lease). Bare: the same data generation, model, optimizer, batches and"
        " per-epoch validation in a plain loop (`bench/bare_loop.py`) that saves only its"
        " final weights. Samples per CPU second = samples trained / the process's CPU time"
        " (all threads) over the whole job; per wall second = the same over wall time;"
        " steps only = the job's own `samples_per_second` (training steps with the control"
        " check after each) against the bare loop's step time.\n\n"
        + table(head, rows)
        + f"\nRatio per CPU second {num(f['ratio_cpu_best'], 3)}; per wall second"
        f" {_ratios(f, 3)} (best / median); steps only {num(f['ratio_steps_best'], 3)}."
        f" Goal ≥ 0.98 (judged on CPU time): {met(_ok_trainer(f))}. The system's job recorded"
        f" {f['system']['events']} events.\n" + _paired(f)
    )


def _paired(f: Figures) -> str:
    """Each system run against the bare run beside it: the machine's speed drifts within
    a run, which moves the best-against-best ratio more than the code does."""
    pairs = [s / b for s, b in zip(f["system"]["cpu_all"], f["bare"]["cpu_all"], strict=False)]
    if not pairs:
        return ""
    listed = ", ".join(num(p, 3) for p in pairs)
    bare = f["bare"]["cpu_all"]
    return (
        f"\nPer CPU second, each system run against the bare run beside it: {listed}"
        f" (median {num(sorted(pairs)[len(pairs) // 2], 3)}). The same bare loop ran from"
        f" {num(min(bare), 1)} to {num(max(bare), 1)} samples per CPU second in this run.\n"
    )


def _commands(f: Figures) -> str:
    n = f["clients"]
    sides = [("api over HTTP", f["system"])]
    if "single" in f:  # figures from before the group commit have no such side
        sides.append(("api, one transaction per submit", f["single"]))
    sides.append(("save() from threads", f["bare"]))
    single = (
        f" Without the api's group commit (`HEIMDALL_SUBMIT_BATCH=1`, one transaction per"
        f" submit, as the baseline does it): {num(f['single_ratio_best'], 2)}."
        if "single" in f
        else ""
    )
    return (
        "## 2. Commands: POST /jobs vs eventsourcing's save()\n\n"
        f"{n} concurrent async clients (aiohttp) POST `/api/v1/training/jobs` to one api"
        " process on PostgreSQL (a schema of its own); the baseline saves the same"
        " `TrainingJob` aggregate with eventsourcing's `Application.save()` from"
        f" {n} threads on the same database. {f['requests_per_round']:,} requests a round"
        f" and side, {f['rounds']} rounds, alternating. The api answers 201 only once the"
        " transaction holding the job has committed and its projector (a process of its own)"
        " has made the job readable (read-your-writes); concurrent submits share"
        " transactions (group commit, up to `HEIMDALL_SUBMIT_BATCH`, 64 by default).\n\n"
        + _latencies(sides)
        + f"\nRatio {_ratios(f)} (best / median); goal ≥ 0.5: {met(f['ratio_best'] >= 0.5)}."
        + single
        + _burst_lag(f)
        + "\n"
    )


def _burst_lag(f: Figures) -> str:
    """The projector's lag under the submit burst (figures since it was measured)."""
    lag = f.get("projector_lag")
    if not lag or not lag["events"]:
        return ""
    return (
        f" The projector's lag under this burst (store → read table, each submit's event,"
        f" polled every 5 ms): p50 {num(lag['p50_ms'])} ms, p99 {num(lag['p99_ms'])} ms,"
        f" max {num(lag['max_ms'])} ms over {lag['events']:,} events, at"
        f" {num(f['system']['best_per_s'])} events/s (goal: p99 under 100 ms)."
    )


def _queries(f: Figures) -> str:
    s = f["setup"]
    out = (
        "## 3. Queries: the api vs a bare FastAPI route running the same SQL\n\n"
        f"{f['jobs']:,} jobs and one job of {f['epochs']:,} epochs, stored as real events"
        f" ({s['events']:,} events, saved in {num(s['save_seconds'], 1)} s) and projected by"
        f" the projection ({num(s['project_seconds'], 1)} s). {f['clients']} concurrent"
        f" clients, {f['rounds']} rounds, alternating. The bare route (`bench/bare_api.py`)"
        " runs the api's SQL through a psycopg pool and returns the rows as they come.\n\n"
    )
    for key, label in QUERY_LABELS.items():
        q = f[key]
        out += (
            f"**{label}**, {f['requests_per_round'][key]:,} requests a round and side\n\n"
            + _latencies([("api", q["system"]), ("bare", q["bare"])])
            + f"\nThroughput ratio {_ratios(q)} (best / median), p99 ratio"
            f" {num(q['p99_ratio'], 2)}; goal ≥ 0.7 and p99 ≤ 1.5x: {met(_ok_query(q))}.\n\n"
        )
    return out


def _live(f: Figures) -> str:
    rows = [
        [side]
        + [num(f[side][k], 1) for k in ("p50_ms", "p99_ms", "max_ms")]
        + [f"{f[side]['messages']:,}", str(f[side]["missing"])]
        for side in ("system", "bare")
    ]
    return (
        "## 4. Live: append → WebSocket clients vs a bare broadcast\n\n"
        f"{f['clients']:,} WebSocket clients (one asyncio process on the same cores) watch one"
        f" job; {f['events']} events a round, one at a time, {f['rounds']} rounds a side,"
        " alternating. System: `EpochCompleted` saved to the store → projector"
        " (LISTEN/NOTIFY, read tables, publish with confirms) → RabbitMQ →"
        " the api's hub → every socket; latency from just before `save()` to each client's"
        " receipt. Bare: a FastAPI route that sends one message to as many sockets; latency"
        " from just before the POST that triggers it.\n\n"
        + table(["", "p50 ms", "p99 ms", "max ms", "messages", "missing"], rows)
        + f"\np99 ratio {num(f['p99_ratio'], 2)}, p50 ratio {num(f['p50_ratio'], 2)};"
        f" goal p99 ≤ bare: {met(_ok_live(f))}. (Issue 6's reference for the bare broadcast:"
        " p50 about 32 ms, p99 130-175 ms.)\n"
    )


def _replay(f: Figures) -> str:
    rows = [
        [label, num(f[key]["best"]), num(f[key]["median"])]
        for label, key in (
            ("rebuild", "rebuild_per_s"),
            ("raw read", "raw_per_s"),
            ("read + decode", "decoded_per_s"),
        )
    ]
    return (
        "## 5. Replay: rebuilding the read tables vs reading the notifications raw\n\n"
        f"{f['events']:,} events ({f['jobs']:,} jobs, one of {f['epochs']:,} epochs),"
        f" {f['rounds']} rounds. Rebuild: `services.projector.replay.rebuild` into fresh"
        " tables (what `heimdall replay` does). Raw: `select_notifications` over the same"
        " range in the same pages, nothing else. Read + decode: raw, plus turning each"
        " notification into its domain event.\n\n"
        + table(["", "events/s (best)", "median"], rows)
        + f"\nRatio {_ratios(f, 3)} (best / median) against the raw read,"
        f" {num(f['ratio_vs_decoded'], 2)} against read + decode; goal ≥ 0.5:"
        f" {met(f['ratio_best'] >= 0.5)}.\n"
    )


def _load(f: Figures) -> str:
    mix = ", ".join(f"{k} {v}%" for k, v in f["mix"].items())
    unexpected = f" {f['unexpected']}" if f["unexpected"] else ""
    listed = "yes" if f["every_accepted_submit_listed"] else "**no**"
    rows = [
        [kind, f"{k['requests']:,}", ", ".join(f"{s}: {n}" for s, n in k["statuses"].items())]
        + [num(k[x]) for x in ("p50_ms", "p99_ms", "max_ms")]
        for kind, k in f["by_kind"].items()
    ]
    return (
        "## 7. Load test (issue 5)\n\n"
        f"{f['clients']} concurrent async clients for {num(f['duration_s'])} s on loopback"
        " against one api process and one projector (PostgreSQL, RabbitMQ), no trainer; 200"
        f" jobs submitted first. Mix: {mix}. Commands pick any submitted job, so racing"
        " pause/resume/cancel get 409 (expected, counted apart); every other non-success is"
        " an error.\n\n"
        f"{f['requests']:,} requests in {num(f['seconds'], 1)} s ({num(f['per_s'])}/s),"
        f" p50 {num(f['p50_ms'])} ms, p99 {num(f['p99_ms'])} ms;"
        f" **{f['unexpected_errors']} unexpected errors**{unexpected},"
        f" {f['conflicts_409']} expected 409s. Accepted submits: {f['accepted_submits']:,};"
        f" all listed afterwards: {listed}.\n\n"
        + table(["kind", "requests", "statuses", "p50 ms", "p99 ms", "max ms"], rows)
    )


def _gpu(f: Figures) -> str:
    out = (
        "## 8. GPU: `bench/gpu.sh`\n\n"
        "`bench/gpu.sh` trains convnext_large in bf16 on the synthetic dataset through the"
        " trainer's own loop (`run_training`) and through a bare loop, and prints samples/s"
        " over the training steps (after 5 warm-up steps), their ratio (goal ≥ 0.95), the peak"
        " GPU memory and the share of step time spent getting batches onto the device. It is"
        " bounded to 5 minutes and needs nothing from the network.\n\n"
    )
    if f["device"] == "cpu":
        out += (
            "**It has not run on a GPU yet**: no GPU was available to this run. What ran is"
            f" its CPU smoke mode (`bench/gpu.sh --cpu`: {f['model']}, batch"
            f" {f['batch_size']}), which checks the script end to end; these figures say"
            " nothing about a GPU.\n\n"
        )
    rows = [
        [
            label,
            num(x["samples_per_second"], 1),
            num(x["wall_samples_per_second"], 1),
            num(x["step_ms_median"], 1),
            f"{num(100 * (x['data_share'] or 0), 1)}%",
            num(x.get("peak_gpu_memory_gib"), 1),
        ]
        for label, x in (("trainer loop", f["system"]), ("bare loop", f["bare"]))
    ]
    head = ["", "samples/s (steps)", "samples/s (wall)", "step ms", "data share", "GPU GiB"]
    return out + table(head, rows) + f"\nRatio {num(f['ratio'], 2)}.\n"


MEMORY: tuple[tuple[str, str, str | None, str], ...] = (
    ("trainer", "trainer service, whole job", "system", "peak_rss_mb"),
    ("trainer", "bare training loop", "bare", "peak_rss_mb"),
    ("commands", "api, commands run", "system", "api_peak_rss_mb"),
    ("queries", "api, queries run", None, "api_peak_rss_mb"),
    ("queries", "bare FastAPI, queries run", None, "bare_peak_rss_mb"),
    ("live", "api with the WebSockets, live run", "system", "api_peak_rss_mb"),
    ("live", "projector, live run", "system", "projector_peak_rss_mb"),
    ("live", "bare FastAPI with the WebSockets", "bare", "bare_peak_rss_mb"),
    ("load", "api, load test", None, "api_peak_rss_mb"),
    ("load", "projector, load test", None, "projector_peak_rss_mb"),
    ("replay", "replay (bench process)", None, "peak_rss_mb"),
)


def _memory(b: Figures) -> str:
    rows = []
    for bench, label, side, key in MEMORY:
        f = b.get(bench)
        if f and "error" not in f:
            rows.append([label, num((f[side] if side else f).get(key))])
    return (
        "## 6. Memory: peak resident memory\n\nEach process's `VmHWM`, read just before it"
        " stopped; the trainer and the bare loop each ran in a process of its own.\n\n"
        + table(["process", "peak RSS MiB"], rows)
    )


def _sum_openloop(f: Figures) -> list[list[str]]:
    a, b, g = f["api"], f["bare"], f["goals"]
    label = f"{num(f['offered_per_s'])} requests/s offered, open loop:"
    rows = []
    for name, key, ratio_key, limit, at_least in (
        ("GET p99 ms", "get_p99_ms", "ratio_get_p99", g["get_p99"], False),
        ("POST p99 ms", "post_p99_ms", "ratio_post_p99", g["post_p99"], False),
        ("served per s", "served_per_s", "ratio_served", g["served"], True),
    ):
        value = f[ratio_key]
        ok = value >= limit if at_least else value <= limit
        goal = f"{'≥' if at_least else '≤'} {limit}"
        rows.append([f"{label} {name}", num(a[key]), num(b[key]), num(value, 2), goal, met(ok)])
    return rows


def _openloop(f: Figures) -> str:
    a, b, lag = f["api"], f["bare"], f["projector_lag"]
    rows = [
        [name]
        + [num(side[k]) for k in ("get_p50_ms", "get_p99_ms", "post_p50_ms", "post_p99_ms")]
        + [num(side["served_per_s"]), num(side["cpu_ms_per_request"], 2), str(side["failed"])]
        for name, side in (("api + projector", a), ("bare Starlette + psycopg", b))
    ]
    head = [
        "side",
        "GET p50",
        "GET p99",
        "POST p50",
        "POST p99",
        "served/s",
        "CPU ms/req",
        "failed",
    ]
    return (
        "## 10. Open-loop mixed load (`bench/openloop.py`)\n\n"
        f"{num(f['offered_per_s'])} requests/s offered (Poisson arrivals; 80 % `GET"
        f" /jobs?limit=20`, 20 % `POST /jobs`; at most {f['clients']} connections; latency"
        f" from the scheduled arrival), {f['rounds']} rounds of {num(f['seconds_per_round'])} s"
        f" per side, alternating, over {f['jobs_listed_from']} jobs. Medians over rounds;"
        " milliseconds.\n\n"
        + table(head, rows)
        + f"\nProjector lag under this load (store → read table): p50 {num(lag.get('p50_ms'))}"
        f" ms, p99 {num(lag.get('p99_ms'))} ms over {lag['events']} events.\n"
    )


def _sum_group(f: Figures) -> list[list[str]]:
    s, b = num(f["system"]["best"], 1), num(f["bare"]["best"], 1)
    ratios = f"{_ratios(f, 3)} (steps: {num(f['ratio_steps_best'], 3)})"
    return [["2-rank group samples per wall second", s, b, ratios, "≥ 0.95", met(_ok_group(f))]]


def _ok_group(f: Figures) -> bool:
    return bool(f["ratio_best"] >= 0.95)


def _group(f: Figures) -> str:
    c = f["config"]
    shape = "x".join(str(d) for d in c["input"])
    rows = [
        [
            side,
            num(f[side]["best"], 1),
            ", ".join(num(x, 1) for x in f[side]["all"]),
            num(f[side]["steps_best"], 1),
            ", ".join(num(x, 1) for x in f[side]["seconds_all"]),
        ]
        for side in ("system", "bare")
    ]
    head = ["", "per wall s (best)", "runs", "steps only", "seconds"]
    first = f["first_step_seconds"]
    return (
        "## 11. A torchrun group: a `devices: 2` job vs two bare DDP ranks (`bench/group.py`)\n\n"
        f"{c['model']}, global batch {c['global_batch']} over {c['world_size']} CPU ranks"
        f" (gloo, one thread each), {c['epochs']} epochs, {c['samples']:,} training samples"
        f" of {shape}; {f['rounds']} runs a side, alternating. System: submitted to"
        " PostgreSQL, claimed by the trainer service and launched as a torchrun group"
        " (`services.trainer.launcher`: the reporter's hooks, a stop agreed by every rank at"
        " every step, the step's numbers summed across ranks, a checkpoint an epoch, the"
        " model and its export). Bare: torchrun's elastic launcher starting two ranks of the"
        " plain loop under DDP. Both timed from the launch to the saved weights.\n\n"
        + table(head, rows)
        + f"\nRatio per wall second {_ratios(f, 3)} (best / median); steps only"
        f" {num(f['ratio_steps_best'], 3)}. Goal ≥ 0.95: {met(_ok_group(f))}. Submit to the"
        f" group's first step: median {num(first['median'], 1)} s"
        f" ({', '.join(num(x, 1) for x in first['all'])}).\n"
    )


PEER_LABELS = {
    "create": "create (10 params) / submit",
    "list": "newest 50 of 1,000",
    "get": "get one",
    "history": "200-point history / 200-epoch metrics",
}


def _ok_peers(f: Figures) -> bool:
    goals = f["goals"]
    return all(
        r["throughput"] >= goals["throughput"] and r["p99"] <= goals["p99"]
        for per_clients in f["ratios"].values()
        for r in per_clients.values()
    )


def _sum_peers(f: Figures) -> list[list[str]]:
    worst = min(r["throughput"] for c in f["ratios"].values() for r in c.values())
    worst_p99 = max(r["p99"] for c in f["ratios"].values() for r in c.values())
    ratios = f"throughput ≥ {num(worst, 1)}x, p99 ≤ {num(worst_p99, 2)}x (worst cell)"
    return [["api against MLflow (peer)", "", "", ratios, "≥ 5x, ≤ 1/3", met(_ok_peers(f))]]


def _peers(f: Figures) -> str:
    rows = []
    for clients, operations in f["ratios"].items():
        for operation, r in operations.items():
            ours, theirs = f["heimdall"][clients][operation], f["mlflow"][clients][operation]
            rows.append(
                [
                    PEER_LABELS[operation],
                    clients,
                    f"{num(ours['ops_per_s'])} / {num(theirs['ops_per_s'])}",
                    num(r["throughput"], 1),
                    f"{num(ours['p99_ms'], 1)} / {num(theirs['p99_ms'], 1)}",
                    num(r["p99"], 2),
                    f"{ours['errors']} / {theirs['errors']}",
                ]
            )
    head = ["operation", "clients", "ops/s (api / MLflow)", "ratio", "p99 ms", "ratio", "errors"]
    memory = f["memory_mb"]
    return (
        "## 12. A peer: MLflow's tracking server under the same load (`bench/peers.py`)\n\n"
        f"{f['peer']}, on its own PostgreSQL database, against the api (one process) and its"
        f" projector; {f['runs']:,} runs and jobs, one of {f['epochs']} epochs; each cell"
        f" {num(f['seconds_per_cell'])} s of closed-loop clients, the systems alternating."
        " MLflow has no one call that creates a run with its params: its create is"
        " `runs/create` then `runs/log-batch`, timed together. `make bench-peers` runs it"
        " (MLflow in its own virtualenv).\n\n"
        + table(head, rows)
        + f"\nGoal: ≥ 5x the throughput and ≤ 1/3 of the p99 on every operation at 10 and 50"
        f" clients: {met(_ok_peers(f))}. Peak resident memory: the api"
        f" {num(memory.get('heimdall_alone'))} MiB alone,"
        f" {num(memory['heimdall'])} MiB with its model-probe child (torch, started by the"
        f" submits' model checks, gone after 30 s idle), its projector"
        f" {num(memory['projector'])} MiB; MLflow's server {num(memory.get('mlflow_alone'))}"
        f" MiB alone, {num(memory['mlflow'])} MiB with its workers.\n"
    )


QUERY_LABELS = {"list_jobs": "GET /jobs?limit=50", "job_metrics": "GET /jobs/{id}/metrics"}
SUMMARY: dict[str, Callable[[Figures], list[list[str]]]] = {
    "trainer": _sum_trainer,
    "commands": _sum_commands,
    "queries": _sum_queries,
    "live": _sum_live,
    "replay": _sum_replay,
    "load": _sum_load,
    "gpu": _sum_gpu,
    "ml": _sum_ml,
    "openloop": _sum_openloop,
    "group": _sum_group,
    "peers": _sum_peers,
}
SECTIONS: dict[str, Callable[[Figures], str]] = {
    "trainer": _trainer,
    "commands": _commands,
    "queries": _queries,
    "live": _live,
    "replay": _replay,
    "load": _load,
    "gpu": _gpu,
    "ml": _ml,
    "openloop": _openloop,
    "group": _group,
    "peers": _peers,
}
