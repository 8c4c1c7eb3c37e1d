"""`nextserve worker`: load the model, then serve the Engine service to routers (rank 0).

The gRPC server starts first and reports NOT_SERVING through grpc.health.v1 while the weights load
and the caches are sized, so orchestration can tell "starting" from "dead".
"""

import argparse
import asyncio
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nextserve.v1 import engine_pb2, engine_pb2_grpc

logger = logging.getLogger("nextserve.worker")
ENGINE_SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags; each defaults to its environment variable (named in --help), read when
    this is called."""
    option = _option_adder(parser)
    option("--model", env="NEXTSERVE_MODEL", help="HF checkpoint folder (default: the built-in model)")
    option("--device", env="NEXTSERVE_DEVICE", default="cpu", help="cpu or cuda")
    option("--dtype", env="NEXTSERVE_DTYPE", default="float32", choices=["float32", "bfloat16", "float16"],
           help="weights and activations")
    option("-tp", "--tensor-parallel-size", env="NEXTSERVE_TP", default=1, type=int, help="ranks (GPUs) per worker")
    option("-k", "--speculative-tokens", env="NEXTSERVE_SPECULATIVE_TOKENS", default=0, type=int,
           help="MTP draft tokens per verification step (0: off)")
    option("--speculative-token-map", env="NEXTSERVE_SPECULATIVE_TOKEN_MAP",
           help="a file of the token ids the MTP head may draft (.pt, .json or text; default: the whole vocabulary)")
    option("--max-num-seqs", env="NEXTSERVE_MAX_NUM_SEQS", default=64, type=int, help="running sequences at most")
    option("--max-num-batched-tokens", env="NEXTSERVE_MAX_NUM_BATCHED_TOKENS", default=2048, type=int,
           help="tokens per engine step at most")
    option("--max-model-len", env="NEXTSERVE_MAX_MODEL_LEN", type=int,
           help="prompt plus output, in tokens (unset or 0: the model's max_position_embeddings)")
    option("--block-size", env="NEXTSERVE_BLOCK_SIZE", default=16, type=int, help="tokens per KV-cache block")
    option("--gpu-memory-utilization", env="NEXTSERVE_GPU_MEMORY_UTILIZATION", default=0.9, type=float,
           help="CUDA: fraction of the card for weights, activations and caches")
    option("--cache-memory-mb", env="NEXTSERVE_CACHE_MEMORY_MB", default=512, type=int,
           help="CPU only: memory for KV blocks and GDN states")
    option("--seed", env="NEXTSERVE_SEED", default=0, type=int, help="sampling seed of requests without one")
    option("--kernel-backend", env="NEXTSERVE_KERNEL_BACKEND", default="auto", choices=["auto", "torch", "triton"],
           help="kernels: auto (Triton on CUDA), torch (the references, for comparison), triton")
    option("--load-format", env="NEXTSERVE_LOAD_FORMAT", default="auto", choices=["auto", "dummy"],
           help="auto: the checkpoint's safetensors; dummy: random weights from config.json (benchmarks)")
    option("--enforce-eager", env="NEXTSERVE_ENFORCE_EAGER", default="0", type=_flag, nargs="?", const=True,
           help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    option("--cuda-graph-sizes", env="NEXTSERVE_CUDA_GRAPH_SIZES", type=_sizes,
           help="CUDA: the batch sizes to capture, comma-separated (default: 1,2,4,8, then every 8 up to "
                "--max-num-seqs); a batch pads up to the next, one above the largest runs eagerly")
    option("--async-scheduling", env="NEXTSERVE_ASYNC_SCHEDULING", default="0", type=_flag, nargs="?", const=True,
           help="launch the next decode step before waiting for the current one's tokens, so host work overlaps "
                "the GPU (one rank)")
    option("--disable-custom-all-reduce", env="NEXTSERVE_DISABLE_CUSTOM_ALL_REDUCE", default="0", type=_flag,
           nargs="?", const=True,
           help="CUDA, tp > 1: NCCL for every all-reduce, instead of the one-shot all-reduce over peer memory "
                "for messages up to 64 KB")


def _sizes(value) -> tuple[int, ...] | None:
    """Comma-separated positive integers (empty: None, the default)."""
    text = str(value).strip()
    if not text:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {value!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {value!r}")
    return sizes


def _flag(value) -> bool:
    """A boolean flag's value from the environment or the command line: 1/true/yes/on or 0/false/no/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {value!r}")


def _option_adder(parser: argparse.ArgumentParser):
    """-> option(*flags, env=NAME, default=None, type=str, help=...): a flag that defaults to its
    environment variable, both named in --help."""

    def option(*flags: str, env: str, default=None, type=str, help: str, **kwargs) -> None:
        shown = "" if default is None else f", default {default}"
        # argparse converts a string default with `type`, so environment values are checked like flags.
        parser.add_argument(*flags, type=type, default=os.environ.get(env, default),
                            help=f"{help} (env {env}{shown})", **kwargs)

    return option


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextserve worker", description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    option = _option_adder(parser)
    option("--host", env="NEXTSERVE_WORKER_HOST", default="127.0.0.1",
           help="address to listen on (loopback unless told otherwise)")
    option("--port", env="NEXTSERVE_WORKER_PORT", default=50061, type=int, help="Engine service port")
    option("--metrics-port", env="NEXTSERVE_WORKER_METRICS_PORT", type=int,
           help="serve Prometheus /metrics on this port of --host (0: pick a free one; unset: no metrics)")
    option("--log-level", env="NEXTSERVE_LOG_LEVEL", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
           help="log level")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def engine_config(args: argparse.Namespace):
    from worker.engine.config import EngineConfig

    model = args.model
    if model is None:
        from worker.tools.builtin_model import builtin_model_dir

        model = str(builtin_model_dir())
    return EngineConfig(
        model=model, device=args.device, dtype=args.dtype, speculative_tokens=args.speculative_tokens,
        speculative_token_map=args.speculative_token_map or None,
        tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len or None,
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        cache_memory_bytes=args.cache_memory_mb << 20, seed=args.seed, kernel_backend=args.kernel_backend,
        load_format=args.load_format, enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
        cuda_graph_sizes=args.cuda_graph_sizes,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
    )


async def serve(args: argparse.Namespace) -> None:
    started = time.monotonic()
    from worker.engine.llm_engine import LLMEngine
    from worker.server.engine_loop import EngineLoop
    from worker.server.metrics import WorkerMetrics
    from worker.server.service import EngineService

    metrics = WorkerMetrics() if args.metrics_port is not None else None
    metrics_port = metrics.serve(args.host, args.metrics_port) if metrics else None
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((ENGINE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", ENGINE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    config = engine_config(args)
    service = EngineService(config.model, config.dtype, config.tensor_parallel_size)
    engine_pb2_grpc.add_EngineServicer_to_server(service, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    logger.info("worker listening on %s:%d, metrics on %s (NOT_SERVING until the model is loaded and the caches "
                "are sized)", args.host, port, "off" if metrics is None else f"{args.host}:{metrics_port}")

    engine = await asyncio.to_thread(LLMEngine, config)
    if metrics is not None:
        metrics.track(engine, {"model": service.model_name, "dtype": config.dtype,
                               "tensor_parallel_size": str(config.tensor_parallel_size),
                               "speculative_tokens": str(config.speculative_tokens)})
    loop = EngineLoop(engine, on_step=metrics.observe_step if metrics else None)
    loop.start()
    service.attach(loop)
    for name in ("", ENGINE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    plan = engine.cache_plan
    k = config.speculative_tokens
    logger.info(
        "worker ready in %.1f s: model=%s dtype=%s device=%s tp=%d k=%d max_model_len=%d blocks=%d (x%d tokens) "
        "slot_groups=%d (x%d slots) max_num_seqs=%d max_concurrency=%.1f port=%d metrics_port=%s",
        time.monotonic() - started, config.model, config.dtype, config.device, config.tensor_parallel_size, k,
        engine.max_model_len, plan.num_blocks, config.block_size, plan.num_state_groups, 1 + k,
        engine.scheduler.config.max_num_seqs, plan.max_concurrency(config.block_size, engine.max_model_len), port,
        "off" if metrics is None else metrics_port,
    )

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("worker stopping")
    for name in ("", ENGINE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=3)
    loop.stop()
    await asyncio.to_thread(engine.shutdown)
    if metrics is not None:
        metrics.close()


class _RequestIdField(logging.Filter):
    """Fills `%(request_id)s` ("-" unless the call passed `extra={"request_id": ...}`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return True


def configure_logging(level: str) -> None:
    """The router's format: time, level, logger, [engine request id], message."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdField())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    from worker.parallel.launch import RankStartupError

    try:
        run(serve(args))
    except (OSError, RankStartupError) as e:  # e.g. the metrics port is taken, a rank died while loading
        logger.error("worker cannot start: %s", e)
        logging.shutdown()
        os._exit(1)
    logging.shutdown()
    # NCCL teardown after CUDA-graph capture can hang in destroy_process_group; everything that
    # matters is done, so leave without waiting on it.
    os._exit(0)


if __name__ == "__main__":
    main()
