"""Batch jobs in OpenAI's Files + Batches shape, durable in SQLite (see store.py for the promise)."""
