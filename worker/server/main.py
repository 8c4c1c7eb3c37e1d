"""`nextserve worker`: load the model, then serve the Engine service to routers (rank 0).

The gRPC server starts first and reports NOT_SERVING through grpc.health.v1 while the weights load
and the caches are sized, so orchestration can tell "starting" from "dead".
"""

import argparse
import asyncio
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nextserve.v1 import engine_pb2, engine_pb2_grpc

logger = logging.getLogger("nextserve.worker")
ENGINE_SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--model", default=env("NEXTSERVE_MODEL"), help="HF checkpoint folder (default: built-in tiny model)")
    parser.add_argument("--device", default=env("NEXTSERVE_DEVICE", "cpu"), help="cpu or cuda")
    parser.add_argument("--dtype", default=env("NEXTSERVE_DTYPE", "float32"), choices=["float32", "bfloat16", "float16"])
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=int(env("NEXTSERVE_TP", "1")))
    parser.add_argument("-k", "--speculative-tokens", type=int, default=int(env("NEXTSERVE_SPECULATIVE_TOKENS", "0")))
    parser.add_argument("--max-num-seqs", type=int, default=int(env("NEXTSERVE_MAX_NUM_SEQS", "64")))
    parser.add_argument("--max-num-batched-tokens", type=int, default=int(env("NEXTSERVE_MAX_NUM_BATCHED_TOKENS", "2048")))
    parser.add_argument("--max-model-len", type=int, default=int(env("NEXTSERVE_MAX_MODEL_LEN", "0")) or None)
    parser.add_argument("--block-size", type=int, default=int(env("NEXTSERVE_BLOCK_SIZE", "16")))
    parser.add_argument("--gpu-memory-utilization", type=float, default=float(env("NEXTSERVE_GPU_MEMORY_UTILIZATION", "0.9")))
    parser.add_argument("--cache-memory-mb", type=int, default=int(env("NEXTSERVE_CACHE_MEMORY_MB", "512")),
                        help="CPU only: memory for KV blocks and GDN states")
    parser.add_argument("--seed", type=int, default=int(env("NEXTSERVE_SEED", "0")))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nextserve worker", description=__doc__)
    add_engine_arguments(parser)
    parser.add_argument("--host", default=os.environ.get("NEXTSERVE_WORKER_HOST", "127.0.0.1"),
                        help="address to listen on (loopback unless told otherwise)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("NEXTSERVE_WORKER_PORT", "50061")))
    return parser.parse_args(argv)


def engine_config(args: argparse.Namespace):
    from worker.engine.config import EngineConfig

    model = args.model
    if model is None:
        from worker.tools.tiny_checkpoint import builtin_model_dir

        model = str(builtin_model_dir())
    return EngineConfig(
        model=model, device=args.device, dtype=args.dtype, speculative_tokens=args.speculative_tokens,
        tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        cache_memory_bytes=args.cache_memory_mb << 20, seed=args.seed,
    )


async def serve(args: argparse.Namespace) -> None:
    from worker.engine.llm_engine import LLMEngine
    from worker.server.engine_loop import EngineLoop
    from worker.server.service import EngineService

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
    logger.info("worker listening on %s:%d (loading the model)", args.host, port)

    engine = await asyncio.to_thread(LLMEngine, config)
    loop = EngineLoop(engine)
    loop.start()
    service.attach(loop)
    for name in ("", ENGINE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    plan = engine.cache_plan
    logger.info(
        "worker ready: model=%s dtype=%s tp=%d k=%d blocks=%d slot_groups=%d max_concurrency=%.1f port=%d",
        config.model, config.dtype, config.tensor_parallel_size, config.speculative_tokens, plan.num_blocks,
        plan.num_state_groups, plan.max_concurrency(config.block_size, engine.max_model_len), port,
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


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    logging.shutdown()
    # NCCL teardown after CUDA-graph capture can hang in destroy_process_group; everything that
    # matters is done, so leave without waiting on it.
    os._exit(0)


if __name__ == "__main__":
    main()
