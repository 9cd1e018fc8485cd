"""`heimdall`: run the services, talk to a running api, train standalone, replay the store."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from heimdall_cli import bundle
from heimdall_cli.client import (
    UNREACHABLE,
    ApiClient,
    ApiError,
    ApiUnreachableError,
    json_problem,
    readable,
)
from shared.domainmodel import STATUSES
from shared.logs import configure_logging
from shared.readmodel.shapes import MetricRow
from shared.security import ConfigurationError
from shared.settings import Settings, load_settings

app = typer.Typer(
    help="Heimdall Training: submit, watch and audit training jobs.", no_args_is_help=True
)
dataset_app = typer.Typer(help="Datasets on disk.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
app.command()(bundle.export)
app.command()(bundle.predict)
console = Console()


def _run_service(run: Callable[[Settings], None]) -> None:
    """Settings and logging, then the service; a configuration error exits 2, clearly."""
    try:
        settings = load_settings()
    except ConfigurationError as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    try:
        run(settings)
    except ConfigurationError as error:
        logging.getLogger("heimdall").critical("%s", error)
        raise typer.Exit(2) from None


@app.command()
def up() -> None:
    """Run api, projector and trainer in one process on the embedded default."""
    from services.runtime import serve_embedded

    _run_service(serve_embedded)


@app.command()
def api() -> None:
    """Run the api alone (its projector runs as `heimdall projector`)."""
    from services.runtime import serve

    _run_service(lambda settings: serve(settings, with_projector=False))


@app.command()
def projector() -> None:
    """Run the projector alone."""
    from services.runtime import run_projector

    _run_service(run_projector)


@app.command()
def trainer() -> None:
    """Run one trainer: it takes runnable jobs from the work queue, one at a time."""
    from services.runtime import run_trainer

    _run_service(run_trainer)


def _refuse(reason: str) -> NoReturn:
    """Bad input from the command line: one line on stderr, exit 2 (as a usage error)."""
    typer.echo(f"heimdall: {reason}", err=True)
    raise typer.Exit(2)


def _load_config(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON (by its suffix) job config file; exit 2 otherwise."""
    text = _read_text(path)
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        _refuse(f"{path}: not JSON: {error.msg} at line {error.lineno}, column {error.colno}")
    except yaml.YAMLError as error:
        _refuse(f"{path}: not YAML: {_yaml_reason(error)}")
    if raw is None:
        _refuse(f"{path}: empty; want a mapping of job config fields")
    if not isinstance(raw, dict):
        _refuse(f"{path}: holds a {type(raw).__name__}; want a mapping of job config fields")
    return raw


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _refuse(f"{path}: no such file")
    except IsADirectoryError:
        _refuse(f"{path}: is a directory, not a file")
    except OSError as error:
        _refuse(f"{path}: cannot read it ({error.strerror})")
    except UnicodeDecodeError as error:
        _refuse(f"{path}: not UTF-8 text (byte {error.start})")


def _yaml_reason(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    if isinstance(error, yaml.MarkedYAMLError) and mark is not None:
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(error).splitlines() or [type(error).__name__])[0]


def _job_id(value: str) -> str:
    """A job id as the api writes it; exit 2 for anything that cannot be one."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        _refuse(f"{value[:60]!r} is not a job id: want a UUID such as {uuid.UUID(int=0)}")


def _fail(error: ApiError) -> NoReturn:
    """The api's answer to a request that failed: a refused input exits 2, the rest 1."""
    if error.status in (400, 422):
        _refuse(f"the api refused the input ({error.status}): {readable(error.detail)}")
    # On stdout, one line however long, as scripts and the tests of `submit` read it.
    console.print(f"[red]error {error.status}[/red]: {escape(error.message)}", soft_wrap=True)
    raise typer.Exit(1)


def _settings() -> Settings:
    """The environment's settings; a bad one exits 2 naming its variable."""
    try:
        return load_settings()
    except ConfigurationError as error:
        _refuse(str(error))


def _client() -> ApiClient:
    return ApiClient(_settings())


@contextmanager
def _api_call() -> Iterator[None]:
    """Talking to the api: its error in one line (exit 1, or 2 for refused input), and no
    answer at all in one line naming the URL tried (exit 3)."""
    try:
        yield
    except ApiUnreachableError as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(UNREACHABLE) from None
    except ApiError as error:
        _fail(error)


@app.command()
def submit(
    config: Annotated[Path | None, typer.Argument(help="YAML or JSON")] = None,
    name: Annotated[str, typer.Option(help="job name")] = "job",
    description: str = "",
    epochs: Annotated[int | None, typer.Option(help="override the config's epochs")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="then watch it live")] = False,
) -> None:
    """Submit a job from a YAML/JSON config file and/or flags."""
    raw = _load_config(config) if config else {}
    body: dict[str, Any] = dict(raw) if "config" in raw else {"config": raw}
    where = str(config or "the flags")
    if not isinstance(body["config"], dict):
        kind = type(body["config"]).__name__
        _refuse(f"{where}: config holds a {kind}; want a mapping of job config fields")
    body.setdefault("job_name", name)
    body.setdefault("description", description)
    overrides = {"epochs": epochs, "model_architecture": model}
    body["config"] = body["config"] | {k: v for k, v in overrides.items() if v is not None}
    if problem := json_problem(body):
        _refuse(f"{where}: {problem}")
    with _api_call():
        job = _client().submit(body)
    console.print(f"submitted [bold]{job['id']}[/bold] ({job['status']})")
    for warning in job.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if watch:
        _watch(job["id"])


@app.command("watch")
def watch_job(job_id: str) -> None:
    """Watch a job live until it ends: exit 0 completed, 1 failed, 3 cancelled."""
    _watch(_job_id(job_id))


def _watch(job_id: str) -> None:
    from heimdall_cli.watch import WatchError, watch

    settings = _settings()
    with _api_call():
        ApiClient(settings).job(job_id)  # the job exists, and the api answers
    try:
        code = asyncio.run(watch(job_id, settings.api_url, console))
    except WatchError as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


WIDE_COLUMNS = 120


def _epoch_and_step(job: dict[str, Any]) -> str:
    """`2/3 40/51` while epoch 2 of 3 runs (step 40 of 51), else `1/3`: recorded epochs."""
    live = job.get("progress") or {}
    if not live:
        return f"{job['current_epoch']}/{job['total_epochs']}"
    return f"{live['epoch']}/{job['total_epochs']} {live['step']}/{live['steps_per_epoch']}"


@app.command()
def jobs(status: str | None = None, limit: int = 50) -> None:
    """List jobs, newest first (ETA, val loss, samples/s, model, device and creation time
    from a width of 120 columns on)."""
    if status and status not in STATUSES:
        _refuse(f"--status {status[:60]!r}: want one of {', '.join(STATUSES)}")
    if limit < 1:
        _refuse(f"--limit {limit}: want 1 to 500")
    from heimdall_cli.watch import duration

    with _api_call():
        page = _client().jobs(status, limit)
    if console.width < WIDE_COLUMNS:  # a plain terminal or a pipe: the essentials, whole
        table = Table("id", "status", "epoch", "name", box=None)
        for job in page["jobs"]:
            table.add_row(job["id"], job["status"], _epoch_and_step(job), escape(job["job_name"]))
        console.print(table)
        console.print(f"{len(page['jobs'])} of {page['total']} jobs")
        return
    table = Table(Column("id", no_wrap=True, min_width=36), "name", "status", "epoch", "ETA",
                  "val loss", "samples/s", "model", "device", "created (UTC)")  # fmt: skip
    for job in page["jobs"]:
        live = job.get("progress") or {}
        table.add_row(
            job["id"],
            escape(job["job_name"]),
            job["status"],
            _epoch_and_step(job),
            duration(live.get("eta_seconds")),
            _shown(job.get("val_loss")),
            _shown(live.get("samples_per_second")),
            escape(job["model_architecture"]),
            escape(job.get("device") or "-"),
            _when(job.get("created_at")),
        )
    console.print(table)
    console.print(f"{len(page['jobs'])} of {page['total']} jobs")


@app.command()
def metrics(
    job_id: str,
    last: Annotated[int, typer.Option(help="how many of the last epochs to show")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="every epoch, as the api gives")] = False,
) -> None:
    """A job's per-epoch metrics: one row per declared metric, one column per epoch."""
    job_id = _job_id(job_id)
    if last < 1:
        _refuse(f"--last {last}: want 1 or more")
    with _api_call():
        rows = _client().metrics(job_id)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    shown = rows[-last:]
    table = Table("metric", *(f"epoch {row['epoch']}" for row in shown))
    table.columns[0].no_wrap = True
    for name in MetricRow.model_fields:
        if name not in ("epoch", "recorded_at", "timestamp"):
            table.add_row(name, *(_shown(row.get(name)) for row in shown))
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"the last {len(shown)} of {len(rows)} epochs (--last, --json)")


def _shown(value: object) -> str:
    """A number for people: 4 significant digits, whole from 1,000 on (metres); nothing
    known is a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _when(stamp: object) -> str:
    """An ISO-8601 moment as `2026-11-28 18:22:08` in UTC; nothing known is a dash."""
    if not isinstance(stamp, str):
        return "-"
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _command(job_id: str, action: str) -> None:
    job_id = _job_id(job_id)
    with _api_call():
        job = _client().command(job_id, action)
    console.print(f"{job['job_id']}: {job['message']}")


@app.command()
def pause(job_id: str) -> None:
    """Pause a job at its next step boundary."""
    _command(job_id, "pause")


@app.command()
def resume(job_id: str) -> None:
    """Resume a paused job from its checkpoint."""
    _command(job_id, "resume")


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job."""
    _command(job_id, "cancel")


@app.command()
def audit(job_id: str) -> None:
    """Who did what to a job, and when: its whole history from the event store."""
    job_id = _job_id(job_id)
    with _api_call():
        page = _client().events(job_id)
    table = Table("position", "when (UTC)", "who", "what", "details")
    for event in page["events"]:
        details = {k: v for k, v in event["data"].items() if k not in ("config", "metrics")}
        table.add_row(
            str(event["position"]),
            _when(event["timestamp"]),
            event["actor"],
            event["kind"],
            json.dumps(details, default=str)[:120],
        )
    console.print(table)


@app.command()
def replay(
    allow_empty: Annotated[
        bool, typer.Option("--allow-empty", help="judge a missing or empty store all the same")
    ] = False,
) -> None:
    """Rebuild the read tables from the store into fresh tables; exit 1 if they differ.

    A store that does not exist or holds no event is exit 2, unless --allow-empty.
    """
    from services.projector.replay import NothingToReplayError, store_to_replay
    from services.projector.replay import replay as run_replay
    from shared.bootstrap import build_read_store

    settings = _settings()
    try:
        store = store_to_replay(settings, allow_empty)
    except NothingToReplayError as error:
        if error.unreachable:
            _refuse(str(error))
        _refuse(f"{error}: nothing to compare (--allow-empty compares all the same)")
    report = run_replay(store, build_read_store(settings), settings)
    for line in report.differences[:50]:
        console.print(f"[red]{escape(line)}[/red]")
    verdict = "[green]equal[/green]" if report.equal else "[red]DIFFERENT[/red]"
    console.print(
        f"replayed {report.events} events up to position {report.position}: "
        f"{report.jobs} jobs, {report.metrics} metric rows; live tables {verdict}"
    )
    raise typer.Exit(0 if report.equal else 1)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML or JSON")],
    artifacts: Annotated[Path, typer.Option(help="where checkpoints and model.pt go")] = Path(
        "var/standalone"
    ),
    resume: Annotated[Path | None, typer.Option(help="a checkpoint to resume from")] = None,
) -> None:
    """Train in the foreground from a job config, with no store, broker or api."""
    from services.api.preflight import PreflightError, preflight
    from services.trainer.checkpoints import CheckpointError
    from services.trainer.standalone import ConfigFileError, load_job_config, train_from_file

    _load_config(config)  # readable, and a mapping: or exit 2 with the reason
    if resume is not None and not resume.is_file():
        _refuse(f"--resume {resume}: no such checkpoint file")
    if artifacts.exists() and not artifacts.is_dir():
        _refuse(f"--artifacts {artifacts}: exists and is not a directory")
    try:
        job = load_job_config(config)
        if job.world_size > 1:
            _refuse(
                f"{config}: devices x nodes = {job.world_size} trains as a torchrun group, and"
                " heimdall train runs one process: submit it to a trainer (heimdall up)"
            )
        preflight(job)
        train_from_file(config, artifacts, console, resume_from=resume)  # its last line says how
    except ConfigFileError as error:
        _refuse("; ".join(line.strip() for line in str(error).splitlines()))
    except PreflightError as error:
        _refuse(f"{config}: {error.message}")
    except CheckpointError as error:
        _refuse(f"--resume {str(error).splitlines()[0]}")


@dataset_app.command("make")
def dataset_make(
    path: Annotated[str, typer.Argument(help="a directory; made when missing")],
    samples: int = 2048,
    receivers: int = 7,
    n_mels: int = 64,
    frames: int = 32,
    seed: int = 0,
) -> None:
    """Write a synthetic dataset to PATH in the documented on-disk format."""
    from services.trainer.dataset import write_dataset
    from shared.config import SyntheticDataset

    if not path:
        _refuse("PATH is empty: want the directory to write the dataset to")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        _refuse(f"{folder}: exists and is not a directory")
    sizes = {"samples": samples, "receivers": receivers, "n_mels": n_mels, "frames": frames}
    try:
        cfg = SyntheticDataset.model_validate({**sizes, "seed": seed})
    except ValidationError as error:
        _refuse("; ".join(_option_problem(e) for e in error.errors()))
    try:
        console.print(f"wrote {write_dataset(folder, cfg)}")
    except OSError as error:
        _refuse(f"{folder}: cannot write the dataset ({error.strerror})")


def _option_problem(error: Any) -> str:
    """A SyntheticDataset field's error as its command-line option's: `--n-mels -1: ...`."""
    field = str(error["loc"][0])
    return f"--{field.replace('_', '-')} {error['input']}: {error['msg']}"


if __name__ == "__main__":
    app()
