"""The SQL store (SQLAlchemy 2.0): the source of truth for batches, requests, chunks, results, workers."""
