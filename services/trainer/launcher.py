"""The group launcher: a job whose world size is above 1 runs as a torchrun group.

The trainer that claimed the job starts its node's ranks with torchrun's elastic agent
(`torch.distributed.launcher.api.elastic_launch`, what `torchrun` itself runs), each
rank being `python -m services.trainer.group SPEC`. The group's reporter rank
(`services.trainer.group`) talks to this process over a local socket: it sends what
the hooks of a single-process job receive (start, every step, each epoch and
checkpoint, the outcome), the trainer runs its own hooks with them (the store, the
lease's signs of life, telemetry, pause, cancel and preemption) and sends back a stop
when one is due. So the group holds one lease and writes through one trainer.

A rank ended by a signal (kill -9, the OOM killer) ends the attempt as a lost worker;
a rank that raised ends it with that rank's error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Protocol

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousError,
)
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from services.trainer.control import (
    Checkpoint,
    Control,
    Metrics,
    Outcome,
    StartInfo,
    StepInfo,
    TrainingHooks,
)
from services.trainer.group import RankSpec

log = logging.getLogger(__name__)
# torchelastic logs every rank's start and end as a JSON event at INFO: the trainer's
# own log lines say what matters.
logging.getLogger("torchelastic-events-null").setLevel(logging.WARNING)


class _OffMainThread(logging.Filter):
    """Drops torchelastic's warning that it cannot install signal handlers off the main
    thread: the trainer launches from a worker thread on purpose, keeps its own handlers
    (stop means preempt), and each rank exits with the trainer (`exit_with_parent`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to register signal handlers" not in record.getMessage()


logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_OffMainThread())
# How often the reporter reads the step's loss for its report (on a GPU a read waits
# for the device): telemetry shows it once a second.
LOSS_READ_SECONDS = 0.25
MONITOR_SECONDS = 0.1  # how often the agent looks at its ranks


class RankLostError(RuntimeError):
    """A rank of the group died without a word (a signal): the attempt's worker is lost."""


class RankFailedError(RuntimeError):
    """A rank of the group raised; `error_type` is its exception's class name."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class GroupAbortedError(RuntimeError):
    """In the reporter: the trainer's hooks refused (a lost claim, the store gone too long)."""


@dataclass(frozen=True)
class Rendezvous:
    """Where a group's nodes meet (torchrun's c10d rendezvous): `endpoint` host:port of
    its store, which this node hosts when `hosts`; `run_id` is the same on every node;
    `local_addr`, how the other nodes reach this one (the first node's ranks' store)."""

    endpoint: str
    hosts: bool
    run_id: str
    nodes: int = 1
    timeout_seconds: float = 600.0
    local_addr: str | None = None  # this node's address for the others (its ranks' store)

    @classmethod
    def local(cls, run_id: str) -> Rendezvous:
        """One host: a store on a free port of the loopback (torchrun --standalone)."""
        return cls("127.0.0.1:0", True, run_id)


class RemoteHooks:
    """The reporter rank's hooks: each call goes to the launcher's trainer, which runs
    its own. `check` never waits for the trainer: it sends the step and takes a stop
    if one has arrived."""

    def __init__(self, address: str, authkey: str) -> None:
        self.conn: Connection = Client(address, family="AF_UNIX", authkey=bytes.fromhex(authkey))
        self.pending = Control.CONTINUE
        self._loss, self._loss_at = float("nan"), 0.0

    def on_start(self, info: StartInfo) -> None:
        self._call("start", info)

    def check(self, step: StepInfo) -> Control:
        if (now := time.monotonic()) >= self._loss_at:
            self._loss, self._loss_at = step.loss, now + LOSS_READ_SECONDS
        report = (step.epoch, step.step, step.steps_per_epoch, self._loss, step.samples_per_second)
        self.conn.send(("step", report))
        while self.conn.poll():
            self._take(self.conn.recv())
        return self.pending

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        self._call("epoch", metrics, is_best, checkpoint)

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        self._call("checkpoint", epoch, uri, sha256)

    def finish(self, outcome: Outcome) -> None:
        """The run's outcome, for the trainer to record."""
        self._call("outcome", outcome)

    def _call(self, kind: str, *args: Any) -> None:
        self.conn.send((kind, args))
        while not self._take(self.conn.recv()):
            pass

    def _take(self, message: tuple[str, Any]) -> bool:
        """Apply one message from the trainer; True for the answer to a call."""
        kind, value = message
        if kind == "control":
            self.pending = Control(value)
            return False
        if kind == "raise":
            raise GroupAbortedError(value)
        return True


class _HookServer(threading.Thread):
    """In the trainer: answers the reporter's calls with `hooks`, and keeps the first
    exception they raised for the launcher to raise again when the group is over."""

    def __init__(self, listener: Listener, address: str, authkey: bytes, hooks: GroupHooks):
        super().__init__(name="group-hooks", daemon=True)
        self.listener, self.address, self.authkey, self.hooks = listener, address, authkey, hooks
        self.outcome: Outcome | None = None
        self.raised: BaseException | None = None
        self._closing = False
        self._sent = Control.CONTINUE
        self.connected = threading.Event()  # a rank of this node reports: the group met

    def run(self) -> None:
        try:
            conn = self.listener.accept()
        except OSError:
            return
        with conn:
            if self._closing:
                return
            self.connected.set()
            try:
                while True:
                    self._serve(conn, *conn.recv())
            except (EOFError, OSError):  # the reporter is gone: the launcher learns why
                return

    def _serve(self, conn: Connection, kind: str, args: Any) -> None:
        try:
            if kind == "step":
                control = self.hooks.check(StepInfo(*args))
                if control is not Control.CONTINUE and control is not self._sent:
                    self._sent = control
                    conn.send(("control", control.value))
                return
            if kind == "start":
                self.hooks.on_start(*args)
            elif kind == "epoch":
                self.hooks.on_epoch(*args)
            elif kind == "checkpoint":
                self.hooks.on_checkpoint(*args)
            elif kind == "outcome":
                self.outcome = args[0]
            conn.send(("ok", None))
        except Exception as error:
            self.raised = self.raised or error
            conn.send(("raise", f"the trainer refused {kind}: {error!r}"))

    def close(self) -> None:
        """Stop waiting for a reporter that never came (it died before connecting)."""
        self._closing = True
        if self.is_alive():
            with contextlib.suppress(OSError):
                Client(self.address, family="AF_UNIX", authkey=self.authkey).close()
        self.join(timeout=5)


class GroupHooks(TrainingHooks, Protocol):
    """What a node's trainer gives `launch_group`: the hooks its first rank reports to,
    and `pending`, asked while the nodes are still meeting (no rank reports yet)."""

    def pending(self) -> Control:
        """A stop asked of this node now (pause, cancel, preemption), else CONTINUE."""
        ...


class JoinerHooks:
    """The hooks of a node that joined another trainer's group: it records nothing (the
    claiming trainer does) and asks for a stop only when its own trainer is stopping."""

    def __init__(self) -> None:
        self.preempting = threading.Event()

    def pending(self) -> Control:
        return Control.PREEMPT if self.preempting.is_set() else Control.CONTINUE

    def on_start(self, info: StartInfo) -> None:
        return None

    def check(self, step: StepInfo) -> Control:
        return self.pending()

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        return None

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        return None


class GroupStoppedError(RuntimeError):
    """The node was asked to stop (`control`) before the group met: nothing trained."""

    def __init__(self, control: Control) -> None:
        super().__init__(f"stopped ({control.value}) before the group's nodes met")
        self.control = control


MEETING_CHECK_SECONDS = 0.5
GROUP_DIR_PREFIX = "heimdall-group-"


def launch_group(
    spec: RankSpec, devices: int, rendezvous: Rendezvous, hooks: GroupHooks
) -> Outcome:
    """Run this node's `devices` ranks of the group until every rank of every node ends.

    The node's first rank reports to `hooks`; on the node that claimed the job
    (`spec.claimed_here`) that rank is the reporter, whose outcome is returned (a node
    that only joins returns its own rank's view). While the nodes are still meeting,
    `hooks.pending()` is asked every MEETING_CHECK_SECONDS; a stop asked then raises
    GroupStoppedError once the agent gives up (its rendezvous timeout) unless the group
    met and ran, in which case the ranks obey it at their first step.
    Raises what the hooks raised (a lost claim, a store outage), RankLostError when a
    rank was ended by a signal, lost its peers or the rendezvous was closed by another
    node, RankFailedError with the first failing rank's error otherwise (a rendezvous that
    did not fill up in time included).
    """
    remove_orphaned_group_dirs()
    prefix = f"{GROUP_DIR_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix) as private:  # mode 0700
        authkey = secrets.token_bytes(32)
        address = os.path.join(private, "hooks")
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
        server = _HookServer(listener, address, authkey, hooks)
        server.start()
        spec = replace(spec, hooks_address=address, authkey=authkey.hex())
        command = ("-m", "services.trainer.group", str(spec.write(Path(private) / "rank.json")))
        agent = _Agent(_launch_config(devices, rendezvous), command)
        agent.start()
        stop = Control.CONTINUE
        try:
            while agent.is_alive():
                agent.join(MEETING_CHECK_SECONDS)
                if server.connected.is_set():
                    continue  # the ranks run: stops arrive with their step reports
                if stop is Control.CONTINUE:
                    stop = hooks.pending()
                    if stop is not Control.CONTINUE:
                        # The agent waits until the other nodes come or its rendezvous
                        # times out; the stop is then recorded rather than a failure.
                        log.info("stop (%s) asked while the group meets", stop.value)
        finally:
            server.close()
            listener.close()
        if server.raised is not None:
            raise server.raised
        if server.outcome is not None:
            return server.outcome
        if stop is not Control.CONTINUE:
            raise GroupStoppedError(stop)
        raise _failure(agent.error, rendezvous)


def _launch_config(devices: int, rendezvous: Rendezvous) -> LaunchConfig:
    return LaunchConfig(
        min_nodes=rendezvous.nodes,
        max_nodes=rendezvous.nodes,
        nproc_per_node=devices,
        run_id=rendezvous.run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=rendezvous.endpoint,
        rdzv_configs={"is_host": rendezvous.hosts, "join_timeout": rendezvous.timeout_seconds},
        max_restarts=0,
        monitor_interval=MONITOR_SECONDS,
        start_method="spawn",
        local_addr=rendezvous.local_addr,
    )


class _Agent(threading.Thread):
    """torchrun's elastic agent for this node, on a thread of its own; keeps its error."""

    def __init__(self, config: LaunchConfig, command: tuple[str, ...]) -> None:
        super().__init__(name="group-agent", daemon=True)
        self.config, self.command = config, command
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            elastic_launch(self.config, sys.executable)(*self.command)
        except BaseException as error:
            self.error = error


def _failure(error: BaseException | None, rendezvous: Rendezvous) -> Exception:
    """What an agent's end without an outcome means for the attempt."""
    if isinstance(error, ChildFailedError):
        return group_error(error)
    if isinstance(error, RendezvousClosedError):
        return RankLostError(f"another node left the group's rendezvous at {rendezvous.endpoint}")
    if isinstance(error, RendezvousError):
        detail = f": {error}" if str(error) else ""
        return RankFailedError(
            type(error).__name__,
            f"the group's {rendezvous.nodes} nodes did not all join at {rendezvous.endpoint}"
            f" within {rendezvous.timeout_seconds:.0f} s{detail}",
        )
    if error is not None:
        return RankFailedError(type(error).__name__, f"torchrun's agent failed: {error}")
    return RankLostError("the group ended without its reporter's outcome")


def remove_orphaned_group_dirs() -> None:
    """Remove the private folders of launches whose trainer died (kill -9 skips the clean
    up): `heimdall-group-<pid>-*` in the temp folder, for a pid no longer running."""
    for folder in Path(tempfile.gettempdir()).glob(f"{GROUP_DIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(GROUP_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


# torch.distributed's errors when a peer rank or node vanished mid-collective (its process
# or host died): the attempt's worker is lost, not the job's code at fault.
PEER_LOST = frozenset({"DistBackendError", "DistNetworkError", "DistStoreError"})
# ... and how gloo says it inside DDP's backward pass, as a plain RuntimeError.
PEER_LOST_TEXT = re.compile(r"gloo/transport/tcp/.*(Connection (reset|closed) by peer|Read error)")


def group_error(failed: ChildFailedError) -> RankLostError | RankFailedError:
    """What a failed group means for its attempt: lost when any rank was ended by a
    signal (a negative exit code) or lost its peers (`PEER_LOST`: another node died),
    else the first failing rank's own error."""
    # The agent ends the other ranks with SIGTERM once one fails: name the one that did.
    signalled = [(r, f) for r, f in failed.failures.items() if f.exitcode < 0]
    if signalled:
        rank, failure = min(
            signalled, key=lambda rf: (rf[1].exitcode == -signal.SIGTERM, rf[1].timestamp)
        )
        name = signal.Signals(-failure.exitcode).name
        return RankLostError(f"rank {rank} (pid {failure.pid}) was ended by {name}")
    rank, first = failed.get_first_failure()
    message = first.message
    text = str(message.get("message", message) if isinstance(message, dict) else message)
    error_type, _, detail = text.partition(": ")
    if not detail or not error_type.isidentifier():
        error_type, detail = "RankFailedError", text or f"exit code {first.exitcode}"
    if error_type in PEER_LOST or PEER_LOST_TEXT.search(detail):
        return RankLostError(f"rank {rank} lost its peers: {detail[:500]}")
    return RankFailedError(error_type, f"rank {rank}: {detail}")
