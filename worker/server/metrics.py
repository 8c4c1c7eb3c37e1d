"""Prometheus metrics of worker rank 0, served over HTTP at /metrics (`--metrics-port`).

Counts and gauges are read from the engine when Prometheus scrapes (`EngineCollector`), so the step
loop pays nothing for them; only the step-time histogram is observed by the loop itself. Each
`WorkerMetrics` has its own registry (never prometheus_client's global one), so a test can build
several in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

# Engine steps take from ~1 ms (a small decode batch on a GPU) to seconds (a long prefill on a CPU).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                1.0, 2.5, 5.0)


class EngineCollector(Collector):
    """Reads an LLMEngine's live state and its `EngineCounters` at scrape time (from the HTTP thread:
    single int and list reads of state that the engine thread only ever replaces or increments)."""

    def __init__(self, engine, info: dict[str, str]):
        self.engine = engine
        self.info = info

    def collect(self):
        engine = self.engine
        stats, counters = engine.stats(), engine.counters
        yield InfoMetricFamily("nextserve_worker_model", "What this worker serves", value=self.info)
        yield _gauge("nextserve_worker_running_sequences", "Sequences in the running batch", stats["num_running"])
        yield _gauge("nextserve_worker_waiting_sequences", "Sequences waiting for admission (preempted ones too)",
                     stats["num_waiting"])
        yield _gauge("nextserve_worker_kv_blocks", "KV-cache blocks in all", stats["num_blocks"])
        yield _gauge("nextserve_worker_kv_blocks_used", "KV-cache blocks held by sequences",
                     stats["num_blocks"] - stats["num_free_blocks"])
        yield _gauge("nextserve_worker_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                     1 - stats["num_free_blocks"] / stats["num_blocks"])
        yield _gauge("nextserve_worker_gdn_slot_groups", "GDN state slot groups in all (1+k slots each)",
                     stats["num_state_groups"])
        yield _gauge("nextserve_worker_gdn_slot_groups_used", "GDN state slot groups held by running sequences",
                     stats["num_state_groups"] - stats["num_free_state_groups"])
        yield _counter("nextserve_worker_preemptions", "Sequences preempted (to be recomputed) since start",
                       stats["num_preemptions"])
        yield _counter("nextserve_worker_steps", "Engine steps since start", counters.num_steps)
        yield _counter("nextserve_worker_batched_tokens", "Tokens fed through the model (prefill chunks, decode "
                       "and verify positions)", counters.num_batched_tokens)
        yield _counter("nextserve_worker_prompt_tokens", "Prompt tokens of requests accepted by the engine",
                       counters.num_prompt_tokens)
        yield _counter("nextserve_worker_generation_tokens", "Tokens generated", counters.num_generated_tokens)
        finished = CounterMetricFamily("nextserve_worker_requests_finished", "Requests finished, by reason",
                                       labels=["reason"])
        for reason, count in list(counters.num_finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield from self._speculative(counters)

    @staticmethod
    def _speculative(counters):
        yield _counter("nextserve_worker_spec_verify_steps",
                       "Verification steps (one per sequence per decode step with drafts)", counters.num_verify_steps)
        yield _counter("nextserve_worker_spec_drafted_tokens", "Draft tokens proposed and verified",
                       counters.num_drafted_tokens)
        yield _counter("nextserve_worker_spec_accepted_tokens", "Draft tokens accepted", counters.num_accepted_tokens)
        by_position = CounterMetricFamily("nextserve_worker_spec_accepted_tokens_by_position",
                                          "Drafts accepted at draft position 1..k", labels=["position"])
        rate = GaugeMetricFamily("nextserve_worker_spec_acceptance_rate",
                                 "Fraction of verification steps since start that accepted the draft at "
                                 "position 1..k", labels=["position"])
        steps = counters.num_verify_steps
        for j, accepted in enumerate(list(counters.accepted_per_position)):
            by_position.add_metric([str(j + 1)], accepted)
            rate.add_metric([str(j + 1)], accepted / steps if steps else 0.0)
        yield by_position
        yield rate


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class WorkerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.step_seconds = Histogram("nextserve_worker_step_duration_seconds",
                                      "Wall time of one engine step (schedule, execute, update)",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self._server = None

    def track(self, engine, info: dict[str, str]) -> None:
        """Export the engine's state and counters (call once the engine exists)."""
        self.registry.register(EngineCollector(engine, info))

    def observe_step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a daemon thread; returns the port (the chosen one for 0)."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}); pick another "
                          f"--metrics-port") from None
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
