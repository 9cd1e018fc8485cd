"""The bus's AsyncAPI document, built from the services' own subscribers.

`python -m services.asyncapi > docs/asyncapi.json` (`make asyncapi`). It builds an api
replica (`create_app`) and one trainer of each kind on a bus that never connects, over a
throwaway embedded store, so each service subscribes exactly as it does when it runs:
the document lists those subscribers, with their handlers' own descriptions, and the
publishers the projector uses. Nothing is started.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from faststream import FastStream
from faststream.specification import AsyncAPI

from services.api.app import create_app
from services.api.deps import ApiContext
from services.trainer.worker import Trainer
from shared.bootstrap import build_app, build_read_store
from shared.bus import WORK_QUEUES_OF_TRAINER
from shared.rabbit import RabbitBus
from shared.settings import Settings

BUS_VERSION = "1.1.0"
DOCS_URL = "amqp://guest:guest@rabbitmq:5672/"


def asyncapi_app() -> FastStream:
    """The bus as the services subscribe to it (see the module's docstring)."""
    bus = RabbitBus(DOCS_URL, private_id=lambda: "{uuid}")
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(data_dir=Path(scratch), worker_name="docs")
        jobs, reads = build_app(settings), build_read_store(settings)
        try:
            create_app(ApiContext(settings=settings, jobs=jobs, reads=reads, bus=bus))
            for kind in WORK_QUEUES_OF_TRAINER:
                Trainer(settings.model_copy(update={"trainer_kind": kind}), jobs, reads, bus)
        finally:
            reads.close()
    spec = AsyncAPI(
        bus.broker,
        title="Heimdall Training bus",
        version=BUS_VERSION,
        description="Every event of the training event store, published in store order by "
        "the projector (message id = store position); after each event that leaves a job "
        "runnable, one work message on the work queue of what the job needs (`work.any`, "
        "`work.cpu`, `work.gpu`), which trainers of that kind consume one at a time.",
    )
    return FastStream(bus.broker, specification=spec)


def asyncapi_json() -> str:
    """The AsyncAPI document, keys sorted so that regenerating it gives a stable diff."""
    with warnings.catch_warnings():  # two trainers share `any` and the nudges: one channel
        warnings.filterwarnings("ignore", "Overwrite channel handler", RuntimeWarning)
        document = asyncapi_app().schema.to_specification().to_jsonable()
    return json.dumps(document, indent=2, sort_keys=True)


if __name__ == "__main__":
    print(asyncapi_json())
