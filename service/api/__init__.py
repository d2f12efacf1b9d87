"""The HTTP front end: ``create_app`` in ``main.py``, routes in ``routes/``."""
