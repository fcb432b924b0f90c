"""Prefect flows for featx: thin wrappers that call `featx` library functions as tasks.

Dependencies point one way: flows -> featx. The flows add retries, persisted results (so a
retried flow run skips finished stages), progress and summary artifacts, and schedules.
"""
