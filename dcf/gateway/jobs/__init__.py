"""Durable async invocation: the API, the store, and the callbacks."""
