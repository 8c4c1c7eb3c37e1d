"""`nextserve serve`: a worker group and a router on this host, started, watched and stopped together.

Children get SIGTERM when this process dies (PR_SET_PDEATHSIG), so no orphan outlives it; on
SIGINT/SIGTERM the router drains first, then the worker stops.
"""

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from worker.client import check_health
from worker.combined_metrics import CombinedMetrics
from worker.server.main import add_engine_arguments

logger = logging.getLogger("nextserve.serve")
STOP_TIMEOUT_S = 10.0


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nextserve serve", description="Start a worker group and a router.")
    add_engine_arguments(parser)
    parser.add_argument("--host", default=os.environ.get("NEXTSERVE_HOST", "0.0.0.0"), help="router address")
    parser.add_argument("--port", type=int, default=int(os.environ.get("NEXTSERVE_PORT", "50051")),
                        help="router port (0: pick a free one)")
    parser.add_argument("--worker-port", type=int, default=int(os.environ.get("NEXTSERVE_WORKER_PORT", "0")),
                        help="worker port on loopback (0: pick a free one)")
    http_port = os.environ.get("NEXTSERVE_ROUTER_HTTP_PORT")
    parser.add_argument("--http-port", type=int, default=int(http_port) if http_port else None,
                        help="also serve the OpenAI-compatible HTTP API on this port (0: pick a free one; "
                             "env NEXTSERVE_ROUTER_HTTP_PORT; unset: none)")
    metrics_port = os.environ.get("NEXTSERVE_METRICS_PORT")
    parser.add_argument("--metrics-port", type=int, default=int(metrics_port) if metrics_port else None,
                        help="serve Prometheus /metrics of the router and the worker together on this port of --host "
                             "(0: pick a free one; env NEXTSERVE_METRICS_PORT; unset: none)")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for readiness")
    args, router_args = parser.parse_known_args(argv)
    args.router_args = router_args  # e.g. --api-key, --max-in-flight: passed to the router as they are
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(argv: list[str]) -> subprocess.Popen:
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen([sys.executable, *argv], preexec_fn=preexec)


def engine_argv(args: argparse.Namespace, model: str) -> list[str]:
    argv = ["--model", model, "--device", args.device, "--dtype", args.dtype,
            "-tp", str(args.tensor_parallel_size), "-k", str(args.speculative_tokens),
            "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--block-size", str(args.block_size), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--cache-memory-mb", str(args.cache_memory_mb), "--seed", str(args.seed),
            "--kernel-backend", args.kernel_backend, "--load-format", args.load_format,
            "--enforce-eager", "1" if args.enforce_eager else "0",
            "--async-scheduling", "1" if args.async_scheduling else "0",
            "--disable-custom-all-reduce", "1" if args.disable_custom_all_reduce else "0"]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.cuda_graph_sizes:
        argv += ["--cuda-graph-sizes", ",".join(map(str, args.cuda_graph_sizes))]
    return argv


def wait_until_serving(address: str, processes: list[subprocess.Popen], timeout: float, stopping: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping:
            raise RuntimeError("stopped during start-up")
        for p in processes:
            if p.poll() is not None:
                raise RuntimeError(f"a child process exited with code {p.returncode} during start-up")
        if check_health(address, timeout=1.0):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING after {timeout:.0f} s")


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM in order (router first, so it drains), then SIGKILL whatever is left after the timeout."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d did not stop in %.0f s; killing it", p.pid, STOP_TIMEOUT_S)
                p.kill()
                p.wait()


def serve_main(argv) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    model = args.model
    if model is None:
        from worker.tools.builtin_model import builtin_model_dir

        model = str(builtin_model_dir())
        logger.info("no --model given: serving the built-in model at %s", model)
    worker_port = args.worker_port or free_port()
    router_port = args.port or free_port()
    http_port = None if args.http_port is None else args.http_port or free_port()
    worker_address = f"127.0.0.1:{worker_port}"
    worker_metrics, router_metrics, combined, metrics_port = [], [], None, None
    if args.metrics_port is not None:
        # Each child serves its own /metrics on loopback; ours, on --host, returns both.
        ports = {"router": free_port(), "worker": free_port()}
        worker_metrics = ["--metrics-port", str(ports["worker"])]
        router_metrics = ["--metrics-port", str(ports["router"]), "--metrics-host", "127.0.0.1"]
        combined = CombinedMetrics({name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()})
        try:
            metrics_port = combined.bind(args.host, args.metrics_port)
        except OSError as e:
            logger.error("%s", e)
            sys.exit(1)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    worker = spawn(["-m", "worker.server", *engine_argv(args, model), "--host", "127.0.0.1", "--port", str(worker_port),
                    *worker_metrics])
    processes = [worker]
    try:
        wait_until_serving(worker_address, processes, args.startup_timeout, stopping)
        http_args = [] if http_port is None else ["--http-port", str(http_port)]
        router = spawn(["-m", "router", "--host", args.host, "--port", str(router_port), "--worker", worker_address,
                        "--model", model, *http_args, *router_metrics, *args.router_args])
        processes.insert(0, router)
        if combined is not None:
            combined.start()
        router_address = f"127.0.0.1:{router_port}"
        wait_until_serving(router_address, processes, 120.0, stopping)
        http = "" if http_port is None else f", http://{args.host}:{http_port}/v1"
        metrics = "" if metrics_port is None else f", metrics http://{args.host}:{metrics_port}/metrics"
        print(f"nextserve ready: grpc://{args.host}:{router_port}{http}{metrics} (model {model}, "
              f"tp {args.tensor_parallel_size}, speculative tokens {args.speculative_tokens})", flush=True)
        while not stopping:
            if any(p.poll() is not None for p in processes):
                logger.error("a child process exited unexpectedly; stopping")
                break
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as e:
        logger.error("%s", e)
    finally:
        stop_all(processes)
        if combined is not None:
            combined.close()
    sys.exit(0 if stopping else 1)
