"""What crosses a process boundary: the signed envelope, task messages, events, records.

Nothing here talks to a broker; everything here can be unit-tested with bytes alone.
"""
