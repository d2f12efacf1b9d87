"""Tests of service/: the API, the broker, the worker, end to end over Redis and embedded."""
