"""Starts two ``jax.distributed`` processes over loopback, again on a new port if the
one picked was taken in the meantime."""

from __future__ import annotations

import socket
import subprocess
from typing import Callable

# What the coordinator (process 0) prints when its port was taken in the meantime.
PORT_TAKEN = "Failed to add port"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(launch: Callable[[int, int, int], tuple[list[str], dict, str]],
                      *, attempts: int = 3, timeout: float = 1200
                      ) -> tuple[int, list[tuple[int, str]]]:
  """Runs ``launch(process_id, port, attempt) -> (argv, env, cwd)`` for processes 0 and
  1 and returns ``(attempt, [(returncode, output), ...])`` of the last attempt.

  Between :func:`free_port` closing its socket and the coordinator binding the port,
  another process may take it. Process 0 then fails at once naming the port, and the
  pair starts over on a new one. ``timeout`` is a hang guard, not a time limit the
  test asserts.
  """
  for attempt in range(attempts):
    port = free_port()
    procs = []
    for pid in range(2):
      argv, env, cwd = launch(pid, port, attempt)
      procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
      outs.append(procs[0].communicate(timeout=timeout)[0])
      if PORT_TAKEN in outs[0]:
        procs[1].kill()
      outs.append(procs[1].communicate(timeout=timeout)[0])
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    if PORT_TAKEN not in outs[0]:
      break
  return attempt, [(p.returncode, out) for p, out in zip(procs, outs)]
