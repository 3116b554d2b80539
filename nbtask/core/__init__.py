"""The task model shared by clients and workers.

Tasks, their options and signatures, handles, canvas, the running-task context, and
building outgoing messages.
"""
