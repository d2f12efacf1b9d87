"""Clients that run next to an eye tracker: the SDK, recorded-session replay and bridges."""
