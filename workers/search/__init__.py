"""The search worker's concern: exact and server-side search strategies per (tenant, type), BM25, index readiness, the
resident-memory budget, single-flight loads, the result's byte budget.
"""
