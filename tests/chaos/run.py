"""`make chaos`: trials of faults at random moments while jobs train and clients watch.

One cluster runs for every trial: an api, a projector and two trainers as processes, on
PostgreSQL and RabbitMQ reached only through fault proxies (the api has a broker proxy of
its own). Each trial submits jobs, opens a WebSocket watcher per job (reconnecting with
`?after=` as `heimdall watch` does), injects one fault at a random moment, waits for the
jobs to end, and checks what really happened against the store:

- every 2xx command's event is in the store;
- every job ended (or runs under a live lease);
- every watcher got every event of its job once, in store order;
- replay into fresh tables equals the live tables;
- no attempt trained on after the next claim (its checkpoint files), and no attempt
  recorded an epoch twice.

    python -m tests.chaos.run --trials 100 --out docs/CHAOS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from websockets.asyncio.client import connect

from shared.settings import Settings
from tests.conftest import POSTGRES_URL, RABBIT_URL, drop_schema
from tests.faults import Proxy
from tests.integration.test_cluster import (
    assert_each_epoch_once_per_attempt,
    assert_replay_equals_live,
    assert_superseded_attempts_wrote_nothing_after,
)
from tests.integration.test_outages import ProxiedCluster
from tests.live import ws_base
from tests.processes import API, Service, settings_env, tiny_config, wait_healthy, wait_until

FAULTS = (
    "kill -9 api",
    "kill -9 projector",
    "kill -9 trainer",
    "SIGTERM trainer",
    "RabbitMQ restart",
    "PostgreSQL restart",
    "api broker cut",
)
TERMINAL = ("completed", "failed", "cancelled")
JOB = {"epochs": 2, "batch_size": 16, "dataset": {"samples": 128, "n_mels": 16, "frames": 16}}


class Watcher(threading.Thread):
    """A WebSocket client of one job: from position 0, reconnecting with `?after=` the
    last position it got until the server closes the stream normally (the job ended)."""

    def __init__(self, base: str, job_id: str, deadline: float) -> None:
        super().__init__(daemon=True)
        self.base, self.job_id, self.deadline = base, job_id, deadline
        self.positions: list[int] = []
        self.reconnects, self.ended = 0, False

    def run(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        while not self.ended and time.monotonic() < self.deadline:
            after = self.positions[-1] if self.positions else 0
            url = f"{self.base}/ws/training/{self.job_id}?after={after}"
            try:
                async with connect(url, open_timeout=10) as socket:
                    async for raw in socket:
                        message = json.loads(raw)
                        if isinstance(message.get("position"), int):
                            self.positions.append(message["position"])
                    self.ended = socket.close_code == 1000
            except Exception:
                pass
            if not self.ended:
                self.reconnects += 1
                await asyncio.sleep(0.5)


@dataclass
class Trial:
    number: int
    fault: str
    at_seconds: float
    jobs: int = 0
    events_checked: int = 0
    commands_checked: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    replay_equal: bool = True
    overlap: int = 0
    watcher_reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Chaos:
    """The cluster, the faults, and the checks."""

    def __init__(self, cluster: ProxiedCluster, api_broker: Proxy, seed: int) -> None:
        self.cluster, self.api_broker, self.chance = cluster, api_broker, random.Random(seed)

    def start(self) -> None:
        c = self.cluster
        api_env = settings_env(
            c.settings.model_copy(update={"broker_url": self.api_broker.url}),
            api_port=c.port,
        )
        c.services["api"] = Service("api", api_env, c.log_dir, "api").start()
        c.start("projector", "projector")
        c.trainer("trainer-a")
        c.trainer("trainer-b")
        wait_healthy(c.client, timeout=120)

    def trial(self, number: int) -> Trial:
        fault = FAULTS[number % len(FAULTS)] if number < len(FAULTS) else self.chance.choice(FAULTS)
        record = Trial(number, fault, round(self.chance.uniform(0.0, 4.0), 2))
        began = time.monotonic()
        accepted: list[tuple[str, str]] = []
        jobs = [self._submit(accepted) for _ in range(2)]
        base = ws_base(self.cluster.client)
        watchers = [Watcher(base, j, time.monotonic() + 240) for j in jobs]
        for watcher in watchers:
            watcher.start()
        time.sleep(record.at_seconds)
        self._inject(fault)
        if self.chance.random() < 0.3:  # a command during the trouble: must not be lost
            self._cancel(jobs[1], accepted)
        self._check(record, jobs, watchers, accepted)
        record.seconds = round(time.monotonic() - began, 1)
        return record

    def _submit(self, accepted: list[tuple[str, str]]) -> str:
        body = {"job_name": f"chaos-{uuid.uuid4().hex[:6]}", "config": tiny_config(**JOB)}
        response = _retry(lambda: self.cluster.client.post(f"{API}/jobs", json=body))
        job_id: str = response.json()["id"]
        accepted.append((job_id, "Submitted"))
        return job_id

    def _cancel(self, job_id: str, accepted: list[tuple[str, str]]) -> None:
        response = _retry(lambda: self.cluster.client.post(f"{API}/jobs/{job_id}/cancel"), 409)
        if response.status_code == 202:
            accepted.append((job_id, "CancelRequested"))

    def _inject(self, fault: str) -> None:
        c = self.cluster
        if fault.startswith("kill -9"):
            name = fault.split()[-1]
            name = self.chance.choice(["trainer-a", "trainer-b"]) if name == "trainer" else name
            c.restart(name)
        elif fault == "SIGTERM trainer":
            name = self.chance.choice(["trainer-a", "trainer-b"])
            process = c.services[name].process
            assert process is not None
            process.send_signal(signal.SIGTERM)
            process.wait(90)
            c.services[name].start()
        else:
            proxy = {
                "RabbitMQ restart": c.rabbit,
                "PostgreSQL restart": c.pg,
                "api broker cut": self.api_broker,
            }[fault]
            with _cut(proxy, self.chance.uniform(1.0, 3.0)):
                pass
            if fault == "RabbitMQ restart":  # the api's connection too
                with _cut(self.api_broker, 0.1):
                    pass

    def _check(
        self, record: Trial, jobs: list[str], watchers: list[Watcher], accepted: list[Any]
    ) -> None:
        c = self.cluster
        record.jobs = len(jobs)
        for job_id in jobs:
            try:
                wait_until(partial(self._ended, job_id), 240, f"job {job_id} to end")
            except AssertionError as error:
                record.stuck += 1
                record.errors.append(str(error))
        for watcher in watchers:
            watcher.join(60)
            record.watcher_reconnects += watcher.reconnects
            stored = [e["position"] for e in c.events(watcher.job_id)]
            record.events_checked += len(stored)
            record.lost += len(set(stored) - set(watcher.positions))
            record.duplicated += len(watcher.positions) - len(set(watcher.positions))
            if watcher.positions != stored and not record.lost and not record.duplicated:
                record.errors.append(f"{watcher.job_id}: out of order {watcher.positions}")
        for job_id, kind in accepted:
            record.commands_checked += 1
            if kind not in [e["kind"] for e in c.events(job_id)]:
                record.lost += 1
                record.errors.append(f"{job_id}: accepted {kind} is not in the store")
        self._check_runs(record, jobs)

    def _check_runs(self, record: Trial, jobs: list[str]) -> None:
        c = self.cluster
        for job_id in jobs:
            events = c.events(job_id)
            try:
                if events[-1]["status"] == "completed":
                    assert_each_epoch_once_per_attempt(events, JOB["epochs"])  # type: ignore[arg-type]
                assert_superseded_attempts_wrote_nothing_after(events, c.settings.artifacts)
            except AssertionError as error:
                record.overlap += 1
                record.errors.append(f"{job_id}: {error}")
        try:
            assert_replay_equals_live(c.settings)
        except AssertionError as error:
            record.replay_equal = False
            record.errors.append(f"replay: {str(error)[:500]}")

    def _ended(self, job_id: str) -> bool:
        response = self.cluster.client.get(f"{API}/jobs/{job_id}")
        return response.status_code == 200 and response.json()["job"]["status"] in TERMINAL


def _retry(call: Callable[[], Any], *ok: int) -> Any:
    """A client that retries 503s and connection errors, as a user (or a proxy) would."""

    def answered() -> Any:
        response = call()
        return response if response.status_code < 500 or response.status_code in ok else None

    return wait_until(answered, 120, "the api to answer")


@contextmanager
def _cut(proxy: Proxy, seconds: float) -> Iterator[None]:
    """Every connection through `proxy` dropped, and new ones refused, for `seconds`."""
    proxy.cut(stay_down=True)
    time.sleep(seconds)
    proxy.open()
    yield


@contextmanager
def chaos_cluster(seed: int) -> Iterator[Chaos]:
    """The cluster on a schema, exchange and queues of its own, torn down afterwards."""
    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    pg, rabbit = Proxy(POSTGRES_URL, 5432).open(), Proxy(RABBIT_URL, 5672).open()
    api_broker = Proxy(RABBIT_URL, 5672).open()
    with TemporaryDirectory(prefix="heimdall-chaos-") as folder:
        settings = Settings(
            database_url=pg.url,
            database_schema=schema,
            broker_url=rabbit.url,
            exchange=f"heimdall.training.{schema}",
            work_queue=f"heimdall.training.work.{schema}",
            lease_seconds=3.0,
            data_dir=Path(folder) / "var",
            artifacts_dir=Path(folder) / "artifacts",
            poll_seconds=0.05,
        )
        cluster = ProxiedCluster(settings, Path(folder), pg, rabbit)
        chaos = Chaos(cluster, api_broker, seed)
        try:
            chaos.start()
            yield chaos
        finally:
            cluster.stop()
            for proxy in (pg, rabbit, api_broker):
                proxy.close()
            drop_schema(schema)


def run(trials: int, seed: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`trials` trials on one cluster; the figures of each and their sum."""
    began = time.monotonic()
    records = []
    with chaos_cluster(seed) as chaos:
        for number in range(trials):
            record = chaos.trial(number)
            records.append(record)
            log(json.dumps(asdict(record)))
    totals = Counter[str]()
    for record in records:
        totals.update({k: int(v) for k, v in asdict(record).items() if isinstance(v, int | bool)})
    return {
        "seed": seed,
        "trials": trials,
        "seconds": round(time.monotonic() - began),
        "faults": dict(Counter(r.fault for r in records)),
        "events_checked": totals["events_checked"],
        "commands_checked": totals["commands_checked"],
        "lost": totals["lost"],
        "duplicated": totals["duplicated"],
        "stuck": totals["stuck"],
        "overlap": totals["overlap"],
        "replay_unequal": sum(not r.replay_equal for r in records),
        "watcher_reconnects": totals["watcher_reconnects"],
        "failed_trials": [asdict(r) for r in records if r.errors],
    }


def render(figures: dict[str, Any]) -> str:
    """docs/CHAOS.md from a run's figures."""
    faults = "\n".join(f"| {k} | {v} |" for k, v in sorted(figures["faults"].items()))
    failed = figures["failed_trials"]
    return (
        "# Chaos run\n\n"
        f"`python -m tests.chaos.run --trials {figures['trials']} --seed {figures['seed']}`"
        f" ({figures['seconds']} s). " + "\n\n".join((__doc__ or "").split("\n\n")[1:3]) + "\n\n"
        "| fault | trials |\n|---|---|\n" + faults + "\n\n"
        "| checked | figure |\n|---|---|\n"
        f"| events compared, watcher against store | {figures['events_checked']} |\n"
        f"| 2xx commands looked up in the store | {figures['commands_checked']} |\n"
        f"| lost (a watcher missed an event, or a 2xx command not stored) | {figures['lost']} |\n"
        f"| duplicated (an event a watcher got twice) | {figures['duplicated']} |\n"
        f"| stuck (a job not ended within 240 s) | {figures['stuck']} |\n"
        f"| trainers overlapping, or an epoch twice in one attempt | {figures['overlap']} |\n"
        f"| replays unequal to the live tables | {figures['replay_unequal']} |\n"
        f"| watcher reconnects (with ?after=) | {figures['watcher_reconnects']} |\n\n"
        "PostgreSQL and RabbitMQ restarts are simulated at the network: the fault proxy drops"
        " every connection to them and refuses new ones for 1 to 3 s, which is what a restart"
        " does to their clients (a real `rabbitmqctl stop_app` is in"
        " `tests/integration/test_cluster.py`).\n\n"
        + (f"Failed trials:\n\n```\n{json.dumps(failed, indent=1)[:4000]}\n```\n" if failed else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--out", type=Path, help="write docs/CHAOS.md here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    figures = run(args.trials, seed)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(render(figures))
    print(json.dumps({k: v for k, v in figures.items() if k != "failed_trials"}, indent=1))
    bad = figures["lost"] + figures["duplicated"] + figures["stuck"] + figures["overlap"]
    raise SystemExit(1 if bad or figures["replay_unequal"] else 0)


if __name__ == "__main__":
    main()
