"""Worker processes that die with their parent.

The stages decode and detect in a spawn-context process pool (not fork: forking a process whose
OpenCV/torch threads already ran can deadlock the child). A pool's workers only notice a parent
killed with SIGKILL when their current task ends (seen: landmarks workers ran on for ~10 s). Here
each worker asks Linux to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG) and exits at once
if the parent is already gone.
"""
from __future__ import annotations

import ctypes
import os
import signal
from multiprocessing import get_context

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init(parent: int, initializer, initargs) -> None:
    _die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(processes: int, initializer=None, initargs: tuple = ()):
    """multiprocessing Pool (spawn context) whose workers are killed when this process dies."""
    return get_context("spawn").Pool(processes, initializer=_init, initargs=(os.getpid(), initializer, tuple(initargs)))
