"""The client side: the :class:`~nbtask.App`, its listener thread, the embedded cluster."""
