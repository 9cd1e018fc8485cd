"""`heimdall`: run the services, talk to a running api, train standalone, replay the store."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from heimdall_cli.client import ApiClient, ApiError
from shared.logs import configure_logging
from shared.security import ConfigurationError
from shared.settings import Settings, load_settings

app = typer.Typer(
    help="Heimdall Training: submit, watch and audit training jobs.", no_args_is_help=True
)
dataset_app = typer.Typer(help="Datasets on disk.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
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


def _load_config(path: Path) -> Any:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _fail(error: ApiError) -> None:
    console.print(f"[red]error {error.status}[/red]: {error.detail}")
    raise typer.Exit(1)


@app.command()
def submit(
    config: Annotated[Path | None, typer.Argument(exists=True, dir_okay=False)] = None,
    name: Annotated[str, typer.Option(help="job name")] = "job",
    description: str = "",
    epochs: Annotated[int | None, typer.Option(help="override the config's epochs")] = None,
    model: Annotated[str | None, typer.Option(help="timm architecture")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="then watch it live")] = False,
) -> None:
    """Submit a job from a YAML/JSON config file and/or flags."""
    body = _load_config(config) if config else {}
    body = body if "config" in body else {"config": body}
    body.setdefault("job_name", name)
    body.setdefault("description", description)
    overrides = {"epochs": epochs, "model_architecture": model}
    body["config"].update({k: v for k, v in overrides.items() if v is not None})
    try:
        job = ApiClient(Settings()).submit(body)
    except ApiError as error:
        _fail(error)
    console.print(f"submitted [bold]{job['id']}[/bold] ({job['status']})")
    if watch:
        _watch(job["id"])


@app.command("watch")
def watch_job(job_id: str) -> None:
    """Watch a job live until it ends: exit 0 completed, 1 failed, 3 cancelled."""
    _watch(job_id)


def _watch(job_id: str) -> None:
    from heimdall_cli.watch import WatchError, watch

    try:
        code = asyncio.run(watch(job_id, Settings().api_url, console))
    except WatchError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@app.command()
def jobs(status: str | None = None, limit: int = 50) -> None:
    """List jobs, newest first."""
    try:
        page = ApiClient(Settings()).jobs(status, limit)
    except ApiError as error:
        _fail(error)
    table = Table("id", "name", "status", "epoch", "val loss", "model", "created")
    for job in page["jobs"]:
        epoch = f"{job['current_epoch']}/{job['total_epochs']}"
        table.add_row(
            job["id"],
            job["job_name"],
            job["status"],
            epoch,
            str(job["val_loss"]),
            job["model_architecture"],
            job["created_at"],
        )
    console.print(table)
    console.print(f"{page['total']} jobs")


def _command(job_id: str, action: str) -> None:
    try:
        job = ApiClient(Settings()).command(job_id, action)
    except ApiError as error:
        _fail(error)
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
    try:
        page = ApiClient(Settings()).events(job_id)
    except ApiError as error:
        _fail(error)
    table = Table("position", "when (UTC)", "who", "what", "details")
    for event in page["events"]:
        details = {k: v for k, v in event["data"].items() if k not in ("config", "metrics")}
        table.add_row(
            str(event["position"]),
            event["timestamp"],
            event["actor"],
            event["kind"],
            json.dumps(details, default=str)[:120],
        )
    console.print(table)


@app.command()
def replay() -> None:
    """Rebuild the read tables from the store into fresh tables; exit 1 if they differ."""
    from services.projector.replay import replay as run_replay
    from shared.bootstrap import build_app, build_read_store

    settings = Settings()
    report = run_replay(build_app(settings), build_read_store(settings), settings)
    for line in report.differences[:50]:
        console.print(f"[red]{line}[/red]")
    verdict = "[green]equal[/green]" if report.equal else "[red]DIFFERENT[/red]"
    console.print(
        f"replayed {report.events} events up to position {report.position}: "
        f"{report.jobs} jobs, {report.metrics} metric rows; live tables {verdict}"
    )
    raise typer.Exit(0 if report.equal else 1)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML or JSON")],
    artifacts: Annotated[Path, typer.Option(help="where checkpoints and model.pt go")] = Path(
        "var/standalone"
    ),
    resume: Annotated[Path | None, typer.Option(help="a checkpoint to resume from")] = None,
) -> None:
    """Train in the foreground from a job config, with no store, broker or api."""
    from services.trainer.standalone import ConfigFileError, train_from_file

    try:
        outcome = train_from_file(config, artifacts, console, resume_from=resume)
    except ConfigFileError as error:
        console.print(f"[red]invalid config[/red]: {error}")
        raise typer.Exit(2) from None
    console.print(f"{outcome.kind} after {outcome.epoch} epochs; model: {outcome.model_uri}")


@dataset_app.command("make")
def dataset_make(
    path: Path,
    samples: int = 2048,
    receivers: int = 7,
    n_mels: int = 64,
    frames: int = 32,
    seed: int = 0,
) -> None:
    """Write a synthetic dataset to PATH in the documented on-disk format."""
    from services.trainer.dataset import write_dataset
    from shared.config import SyntheticDataset

    cfg = SyntheticDataset(
        samples=samples, receivers=receivers, n_mels=n_mels, frames=frames, seed=seed
    )
    console.print(f"wrote {write_dataset(path, cfg)}")


if __name__ == "__main__":
    app()
