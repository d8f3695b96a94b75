"""MongoDB and tenant data versions: the pooled client, what search reads, what ingestion writes, indexes, and the
change log that lets a search catch up.
"""
