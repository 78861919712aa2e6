"""Adapters: the ways SIP proxies and tools talk to the engine."""
