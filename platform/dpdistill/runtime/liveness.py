"""Whether the process that wrote a run folder's ``running`` status is still there.

A run folder says ``running`` from its creation until the runner writes its outcome (completed, failed,
interrupted). Ctrl-C and SIGTERM reach that write; a SIGKILL, an out-of-memory kill, a lost node or a Ray Job
stopped past its grace period do not, and the folder would say ``running`` forever. So the runner records who owns
the folder (:func:`owner`: host, PID and the process's start time) in status.json, and readers (``report``,
``compare``) show a ``running`` folder whose owner is gone as ``lost`` (:func:`shown_status`). Readers never
rewrite the folder: status.json stays what the process last wrote.

Only what can be told for sure counts as gone: the same host (by name), and no process with that PID, or one
that started at another time (the PID was reused). A folder written on another host, or by a runner before this
record existed, keeps its ``running``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

LOST = "lost"


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on, or [] (not Linux, no such process, unreadable). The command name
    (field 2) may hold spaces and parentheses, so the fields are counted from its closing one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2:].split()


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22), or None."""
    try:
        return int(_stat_fields(pid)[19])
    except (IndexError, ValueError):
        return None


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, D, Z, ...; field 3), or None."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def owner(pid: int | None = None) -> dict[str, Any]:
    """This process (or ``pid``) as status.json records the folder's owner: host, PID, start time."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid)}


def owner_gone(record: Any) -> bool:
    """Whether the recorded owner is certainly not running any more (see the module docstring)."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return False
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process with that PID: alive, but is it ours?
        pass
    if _state(pid) == "Z":  # killed, not yet reaped by its parent: it will write nothing more
        return True
    ticks = record.get("start_ticks")
    now = _start_ticks(pid)
    return ticks is not None and now is not None and now != ticks


def shown_status(status: dict[str, Any]) -> str:
    """status.json's status as a reader should show it: ``lost`` for a ``running`` folder whose owner is gone."""
    value = str(status.get("status", "?"))
    if value == "running" and owner_gone(status.get("process")):
        return LOST
    return value
