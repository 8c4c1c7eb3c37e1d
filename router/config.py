"""The router's configuration: one dataclass, validated when built.

Flags and `NEXTSERVE_ROUTER_*` environment variables are parsed once, in `router.main`; nothing here
reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_worker_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"worker address {address!r} must look like host:port (e.g. localhost:50061)")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"worker address {address!r}: port must be in 1..65535")
    return host, port


@dataclass
class RouterConfig:
    """Everything the router needs; `__post_init__` refuses nonsense with a message naming the field."""

    model: str
    workers: list[str]
    host: str = "0.0.0.0"
    port: int = 50051  # 0: the OS picks a free port (logged at start)
    http_port: int | None = None  # the OpenAI-compatible HTTP API on host:http_port; None: off, 0: a free port
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on host:metrics_port; None: off, 0: a free port
    metrics_host: str | None = None  # the address of the metrics port; None: host
    max_in_flight: int = 256  # requests streaming through this router at once
    max_queue: int = 1024  # requests waiting for one of those slots; beyond: RESOURCE_EXHAUSTED
    max_prompt_tokens: int | None = None  # extra cap below the model's max_model_len
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_request_bytes: int = 4 * 1024 * 1024  # gRPC's receive limit; larger requests get RESOURCE_EXHAUSTED
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reconnect_min_s: float = 0.1  # first wait before reconnecting to a failed worker, doubled each try
    reconnect_max_s: float = 3.0
    worker_timeout_s: float = 5.0  # bound on GetInfo calls to a worker
    drain_s: float = 5.0  # on SIGTERM: how long in-flight streams may take to finish
    log_level: str = "INFO"
    worker_addresses: list[tuple[str, int]] = field(init=False, repr=False)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: the model folder (with tokenizer.json) is required")
        model_dir = Path(self.model)
        if not (model_dir / "tokenizer.json").is_file():
            raise ValueError(f"model: {model_dir} has no tokenizer.json (the router tokenizes with it)")
        if not self.workers:
            raise ValueError("workers: give at least one worker address (host:port)")
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"workers: duplicate addresses in {self.workers}")
        self.worker_addresses = [parse_worker_address(address) for address in self.workers]
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0: pick a free port), got {self.port}")
        for name in ("http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in 0..65535 (0: pick a free port), got {value}")
        for name in ("max_in_flight", "max_stop_strings", "max_stop_string_bytes", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or unset, got {self.max_prompt_tokens}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be blank (leave it unset to turn the check off)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path}")
        for name in ("reconnect_min_s", "reconnect_max_s", "worker_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s ({self.reconnect_max_s}) must be >= reconnect_min_s "
                             f"({self.reconnect_min_s})")
        if not (math.isfinite(self.drain_s) and self.drain_s >= 0):
            raise ValueError(f"drain_s must be >= 0 seconds, got {self.drain_s}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    @property
    def model_name(self) -> str:
        """What GetModelInfo reports: the model folder's name."""
        return Path(self.model).resolve().name
