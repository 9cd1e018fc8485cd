"""The api's model probes run in a short-lived child: its own process never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.api import probes
from services.api.probes import ModelProbe, ModelProbes

# Run in a fresh interpreter: this test process has torch loaded already.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from services.api.probes import ModelProbes

    probes = ModelProbes(idle_seconds=0.5)
    first = probes.probe("convnext_atto", (7, 16, 16), 4)
    again = probes.probe("convnext_atto", (7, 16, 16), 4)
    refused = probes.probe("resnet18", (7, 16, 16), 1)  # batch norm needs 2
    names = probes.architectures()
    torch_here = "torch" in sys.modules
    deadline = time.monotonic() + 20
    while probes.child_running and time.monotonic() < deadline:
        time.sleep(0.05)
    retired = not probes.child_running
    probes.probe("resnet18", (7, 16, 16), 4)  # a new child
    for pid in list(probes._pool._processes):  # the child dies between two questions
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    after_kill = probes.probe("resnet18", (1, 8, 8), 2)
    print(json.dumps({
        "parameters": first.parameters, "flops": first.forward_flops_per_sample,
        "same": again == first, "refused": refused.problem, "names": len(names),
        "torch_here": torch_here or "torch" in sys.modules, "retired": retired,
        "after_kill": after_kill.problem is None and after_kill.parameters > 0,
        "children": probes.children_started,
    }))
    """
)


def test_probes_answer_from_a_child_that_retires_and_is_replaced() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["torch_here"] is False  # the asking process never imported torch
    assert found["parameters"] > 10**6 and found["flops"] > 0 and found["same"] is True
    assert found["refused"][0] == "batch_size"
    assert found["names"] > 1000 and found["retired"] is True
    assert found["after_kill"] is True and found["children"] >= 3


def test_the_same_question_asked_at_once_is_probed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of submits of a model not seen yet waits for one probe, not one each (they
    queued behind each other in the one child: 40 submits took 6 s)."""
    calls: list[tuple[Any, ...]] = []
    gate = threading.Event()

    def slow_probe(*args: Any) -> ModelProbe:
        calls.append(args)
        gate.wait(5)
        return ModelProbe(None, 7, 11)

    monkeypatch.setattr(probes, "probe_model", slow_probe)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", probes))  # ask in place
    asking = ModelProbes()
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(asking.probe, "resnet18", (7, 16, 16), 4) for _ in range(8)]
        time.sleep(0.3)
        gate.set()
        found = {a.result(timeout=10) for a in answers}
    assert found == {ModelProbe(None, 7, 11)} and len(calls) == 1
    assert asking.probe("resnet18", (7, 16, 16), 4) == ModelProbe(None, 7, 11) and len(calls) == 1


# A parent that asks once, says its child's pid, then waits to be killed.
ORPHAN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from services.api.probes import ModelProbes

    probes = ModelProbes(idle_seconds=600)
    probes.probe("convnext_atto", (7, 16, 16), 4)
    print(*probes._pool._processes, flush=True)
    time.sleep(600)
    """
)


def test_a_child_whose_api_was_killed_exits_too() -> None:
    """kill -9 of an api must not leave its probe child (about 1 GB with torch) behind:
    a ProcessPoolExecutor worker holds its own pipe open and never sees the parent go."""
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        (child,) = map(int, parent.stdout.readline().split())
    finally:
        parent.kill()
        parent.wait(30)
    deadline = time.monotonic() + 15
    while _alive(child):
        assert time.monotonic() < deadline, f"the probe child {child} outlived its api"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
