"""Celery and deployment configuration of the worker service (installed as ``memq.config``).

Settings themselves are read once, from ``MEMQ_*``, by ``memq.core.settings``.
"""
