"""Stored topics are pinned and resolvable by a process that never created an event."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.bootstrap import build_app
from shared.settings import Settings

DECODE = """
import sys
from pathlib import Path
from shared.bootstrap import build_app
from shared.settings import Settings
app = build_app(Settings(data_dir=Path(sys.argv[1])))
print(",".join(e.kind for e in app.feed(0, 100)))
"""


def test_a_fresh_process_decodes_every_event_kind(tmp_path: Path) -> None:
    app = build_app(Settings(data_dir=tmp_path))
    job = app.submit("topics", "", {"epochs": 2, "max_attempts": 1}, "tester").job
    app.pause(job.id, "tester")
    app.resume(job.id, "tester")
    app.change(job.id, lambda j: j.claim("w", "cpu", 8, 2))
    app.change(job.id, lambda j: j.lose_worker(1, "reaper"))
    app.archive(job.id, "tester")
    topics = [n.topic for n in app.recorder.select_notifications(1, 100)]
    assert all(t.startswith("heimdall.training:") for t in topics), topics
    decoded = subprocess.run(
        [sys.executable, "-c", DECODE, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert decoded == "Submitted,PauseRequested,ResumeRequested,Started,WorkerLost,Archived"
