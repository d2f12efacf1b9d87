"""foveate's live service: a FastAPI front end and a learning worker.

The worker (``service.worker``) holds the learner and every stream's state; the API
(``service.api``) is stateless and talks to it through a broker (``service.broker``): an
in-process queue in the embedded default, Redis Streams when ``FOVEATE_REDIS_URL`` is set.
"""
