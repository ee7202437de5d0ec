"""natskit's benchmarks: each scenario run for natskit and for plain nats-py, side by side.

``python -m benchmarks`` (``make bench``) starts an embedded ``nats-server``, runs every
scenario of :mod:`benchmarks.scenarios` for both sides in their own processes, and prints
the median rate of each side and the ratio natskit / nats-py. See ``benchmarks/README.md``.
"""
