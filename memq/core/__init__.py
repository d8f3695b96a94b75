"""The rules every side shares: wire messages, field rules, settings, keys, names, deadlines, ranking.

Import-light (pydantic, numpy, the bson codec; no Celery, Redis client, MongoDB driver or torch): a web process, a
worker and an operator tool all stand on it.
"""
