"""Tests of service/api: the routes on a real uvicorn (embedded mode)."""
