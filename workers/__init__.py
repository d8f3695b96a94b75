"""Per-worker-kind process resources (model, MongoClient, Redis) and their start-up.

Nothing heavy happens at import: each resource is built on first use in the process that uses it,
and rebuilt if the process was forked after it was built.
"""
