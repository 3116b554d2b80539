"""``nbtask worker``: the supervisor, its child processes, and how a task is settled."""

from nbtask.worker.supervisor import EXIT_OK, EXIT_SIGNAL, Worker

__all__ = ["EXIT_OK", "EXIT_SIGNAL", "Worker"]
