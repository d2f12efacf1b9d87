"""``Settings``: the service's one configuration object, read from ``FOVEATE_*`` environment variables.

The model settings are made from :class:`learner.config.ModelConfig` itself: one per dataclass field
(but ``in_features``, the trunk's width), with its name, type, default and the description from its
docstring (``FOVEATE_N_UNITS`` → ``n_units``), so a new model field is a setting without another line
here. :meth:`Settings.model_config_obj` passes them back, and ``ModelConfig`` checks their values
(``ConfigError``). Everything else configures the service: device, batching, Redis keys,
checkpoints and the limits that protect the worker from bad input.

Examples
--------
>>> settings = Settings(n_units=64, embed_dim=16)
>>> settings.model_config_obj().n_units
64
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from learner.config import ModelConfig

#: Stream ids allowed in URLs and request bodies.
STREAM_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
#: Stream ids on the wire between the API and the worker (Redis messages): a client's id, possibly
#: qualified by its key's namespace (``lab-a:rig1``, 32 + 1 + 128 characters at most).
QUALIFIED_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,161}$"

#: ModelConfig fields that are no setting: the trunk's width follows from the trunk; a peripheral
#: preview is an input the API does not carry yet (bench.controls --preview feeds it to the learner),
#: so neither its width nor its projection's learning rate is a setting.
_DERIVED = frozenset({"in_features", "preview_features", "preview_lr_scale"})
#: The Settings fields passed to ModelConfig under the same name: every field of it but the derived.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in _DERIVED)


def _parameter_docs(doc: str) -> dict[str, str]:
    """Each name's text in a numpydoc ``Parameters`` section (``a, b`` lines share one text)."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Parameters") + 2
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            names = [name.strip() for name in line.split(",")]
            continue
        for name in names:
            docs[name] = f"{docs.get(name, '')} {line.strip()}".strip()
    return docs


def _model_settings() -> type[BaseSettings]:
    """A BaseSettings with one field per entry of MODEL_FIELDS: ModelConfig's type, default, doc."""
    types = typing.get_type_hints(ModelConfig)
    docs = _parameter_docs(ModelConfig.__doc__ or "")
    fields: dict[str, Any] = {
        f.name: (types[f.name], Field(default=f.default, description=docs.get(f.name)))
        for f in dataclasses.fields(ModelConfig)
        if f.name in MODEL_FIELDS
    }
    return create_model("ModelSettings", __base__=BaseSettings, __module__=__name__, **fields)


if TYPE_CHECKING:

    class _ModelSettings(BaseSettings):
        # The fields exist only once _model_settings() has run; type checkers see them as Any.
        def __getattr__(self, name: str) -> Any: ...

else:
    _ModelSettings = _model_settings()


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(_ModelSettings):
    """Every setting of the API and the worker; each field is read from ``FOVEATE_<FIELD>``.

    Parameters
    ----------
    <each field of ModelConfig but in_features>
        The model, passed to :class:`learner.config.ModelConfig` (see its docstring; the module
        docstring says how these fields are made).
    learner
        ``rfp`` (the service's learning rule) or ``bptt`` (truncated BPTT baseline, window ``bptt_window``).
    device
        ``auto`` takes CUDA when torch sees a GPU, the CPU otherwise.
    torch_threads
        CPU threads of the learner (``torch.set_num_threads``); 0: every core the process may use but
        one, in every mode (``service.learner_setup.torch_threads``): the one left is for the API's event
        loop, the decode threads and Redis, in this process or beside it (docs/deploy.md, Threads).
    max_batch, max_wait_ms
        A worker tick takes up to ``max_batch`` fixations (one per stream), waiting at most
        ``max_wait_ms`` after the first one for more.
    redis_url
        ``None``: the embedded mode (one process, in-process queue). Otherwise Redis Streams.
    input_stream, control_stream, results_stream, result_key_prefix, consumer_group, consumer_name,
    heartbeat_key, journal_stream
        Redis key names (see docs/redis-format.md).
    checkpoint_path, checkpoint_interval_s
        Where and how often the worker saves everything; ``None`` disables checkpoints.
    max_body_bytes, max_pixels, max_batch_fixations, sync_timeout_s, max_streams, max_queue
        Limits: request body (413), decoded image pixels (413), fixations per batch request,
        the wait for a synchronous result (504), live streams (429), queued fixations (429).
    max_patch_px, decode_threads
        The largest patch cut from a frame (``size_px``, or ``size_deg * px_per_deg``), and how many
        images the API decodes at once: together with ``max_pixels`` they bound a request's memory.
    keys_file, api_keys, allow_no_auth, protect_ops
        API keys (service/auth.py): a keys file and/or stored key lines. With neither, every request
        is allowed, which the server accepts only on a loopback address unless ``allow_no_auth``.
        ``protect_ops``: ``/metrics`` and ``/readyz`` need a key with ``read`` too.
    rate_limit_per_s, rate_limit_burst, max_streams_per_key
        Per key: requests per second (a token bucket of ``rate_limit_burst``; 0: no limit), and live
        streams of its namespace (429 with ``Retry-After``).
    cors_origins
        Comma-separated origins that browsers may call the API from (CORS); none by default.
    header_timeout_s, body_timeout_s, keep_alive_s, max_header_bytes, max_connections
        The HTTP server's limits: a request's headers must arrive within ``header_timeout_s`` and
        its body within ``body_timeout_s`` (408); idle keep-alive connections close after
        ``keep_alive_s``; headers over ``max_header_bytes`` get 431; more concurrent connections 503.
    shards, dist_timeout_s
        ``shards``: how many ranks the distributed worker has (``foveate worker --distributed``
        under torchrun: its ``WORLD_SIZE``); the API writes each stream's fixations and commands to
        its rank's Redis streams (service/shards.py). 1: the single worker's stream names, unchanged.
        ``dist_timeout_s``: how long a rank waits in a collective for the others before it reports
        ``RankLost`` and exits (service/dist_worker.py).
    control_secret
        Shared by API and worker in Redis mode: commands on the control stream are signed with it
        (HMAC-SHA256) and the worker drops unsigned or forged ones.
    max_state_mb
        Memory for the streams' state (h, c, traces; about 1.05 MB a stream at the default model),
        in whole chunks of 64 streams. Beyond it the least recently used streams spill to files next
        to the checkpoint and come back on their next fixation; without a checkpoint path a new
        stream past it is refused (429).
    """

    model_config = SettingsConfigDict(env_prefix="FOVEATE_", extra="ignore", validate_default=True)

    # --- the learner and where it runs ---
    learner: Literal["rfp", "bptt"] = "rfp"
    bptt_window: int = Field(default=10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(default=64, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    torch_threads: int = Field(default=0, ge=0)
    diagnostics_interval_s: float = Field(default=5.0, gt=0.0)

    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9101, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- Redis Streams ---
    redis_url: str | None = Field(default=None, repr=False)  # may hold a password
    input_stream: str = "foveate:fixations"
    control_stream: str = "foveate:control"
    results_stream: str = "foveate:results"
    result_key_prefix: str = "foveate:result:"
    consumer_group: str = "foveate-workers"
    consumer_name: str = Field(default_factory=_default_consumer)
    heartbeat_key: str = "foveate:worker:heartbeat"
    journal_stream: str = "foveate:journal"
    heartbeat_timeout_s: float = Field(default=10.0, gt=0.0)
    stream_maxlen: int = Field(default=100_000, ge=100)
    results_maxlen: int = Field(default=100_000, ge=100)
    stream_results_maxlen: int = Field(default=1_000, ge=10)
    result_ttl_s: int = Field(default=60, ge=1)
    claim_idle_ms: int = Field(default=30_000, ge=100)
    shards: int = Field(default=1, ge=1, le=1024)
    dist_timeout_s: float = Field(default=30.0, gt=0.0)

    # --- checkpoints ---
    checkpoint_path: Path | None = Path("checkpoints/foveate.pt")
    checkpoint_interval_s: float = Field(default=300.0, gt=0.0)

    # --- limits ---
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=4096 * 4096, ge=1)
    max_batch_fixations: int = Field(default=256, ge=1)
    sync_timeout_s: float = Field(default=10.0, gt=0.0)
    max_streams: int = Field(default=10_000, ge=1)
    max_state_mb: int = Field(default=4096, ge=1)
    max_queue: int = Field(default=10_000, ge=1)
    max_patch_px: int = Field(default=1024, ge=2)
    decode_threads: int = Field(default=2, ge=1, le=64)

    # --- authentication and per-key quotas ---
    keys_file: Path | None = None
    api_keys: str | None = Field(default=None, repr=False)
    allow_no_auth: bool = False
    protect_ops: bool = False
    rate_limit_per_s: float = Field(default=1000.0, ge=0.0)
    rate_limit_burst: int = Field(default=2000, ge=1)
    max_streams_per_key: int = Field(default=1000, ge=1)
    cors_origins: str = ""
    control_secret: SecretStr | None = None

    # --- the HTTP server (uvicorn) ---
    header_timeout_s: float = Field(default=10.0, gt=0.0)
    body_timeout_s: float = Field(default=60.0, gt=0.0)
    keep_alive_s: int = Field(default=5, ge=1)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    max_connections: int = Field(default=1000, ge=1)

    @field_validator("redis_url", "checkpoint_path", "trunk_weights", "keys_file", "control_secret",
                     mode="before")  # fmt: skip
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # FOVEATE_REDIS_URL= (set but empty) in a compose file means "not set", not "the URL ''".
        return None if isinstance(value, str) and not value.strip() else value

    def model_config_obj(self) -> ModelConfig:
        """The :class:`ModelConfig` these settings describe (raises ``ConfigError`` if out of range)."""
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` as a list (empty: CORS off)."""
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def embedded(self) -> bool:
        """True when no Redis URL is set: API and worker share one process."""
        return self.redis_url is None


def model_fields() -> tuple[str, ...]:
    """Names of the Settings fields that are passed to ModelConfig."""
    return MODEL_FIELDS
