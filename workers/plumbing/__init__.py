"""Celery plumbing of every worker kind: the poison guards (Redis and AMQP), remote control, the watch on the broker's
own dead letters, Prometheus metrics, filing merged results in the result cache.
"""
