"""What a web process runs: the retrieval API, the Celery app and canvases, result waiting, the result cache.

Never imports torch, sentence-transformers, pymongo or the worker side (import-linter checks it).
"""
