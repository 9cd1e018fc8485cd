"""A child process that must not outlive the process that started it."""

from __future__ import annotations

import os
import threading
import time

PARENT_CHECK_SECONDS = 1.0


def exit_with_parent(parent: int) -> None:
    """In the child: exit once `parent` (a pid) is gone. A ProcessPoolExecutor worker holds
    its own pipes open, so it never sees an api killed with SIGKILL and would live on (with
    torch, about 1 GB); a torchrun rank would train on for nobody. Polls the parent pid
    once a second from a daemon thread (PR_SET_PDEATHSIG would fire when the thread that
    started the child ends, which may be any of the parent's worker threads)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
