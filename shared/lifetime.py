"""A process's life: a child that must not outlive its parent, a long-lived service's heap."""

from __future__ import annotations

import gc
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


def freeze_startup_heap() -> None:
    """In a long-lived service, once started: move every object alive now (modules,
    classes, the app) out of the garbage collector's reach. A full (generation 2)
    collection otherwise walks all of them, and paused the api's event loop for 50-80 ms
    under load (measured with `gc.callbacks`), every request waiting meanwhile. They are
    never freed anyway. The technique and its trade-offs: `gc.freeze` in the Python docs,
    and Instagram's "Copy-on-write friendly Python garbage collection" (2017)."""
    gc.collect()
    gc.freeze()
