"""Operator tools: the ``memq`` command line, status, the queue exporter, Flower, dead letters, broker set-up, and the
local services of the demo.
"""
