"""Delivery: the worker that drains the queue, the relay connection pool, retries."""
