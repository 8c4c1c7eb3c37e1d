"""Small gRPC clients for the command line: `nextserve generate` and `nextserve health` (no torch)."""

import argparse
import os
import sys

import grpc

DEFAULT_SERVER = os.environ.get("NEXTSERVE_SERVER", "127.0.0.1:50051")


def generate_main(argv) -> None:
    from nextserve.v1 import generation_pb2, generation_pb2_grpc

    parser = argparse.ArgumentParser(prog="nextserve generate", description="Stream an answer to the terminal.")
    parser.add_argument("prompt")
    parser.add_argument("--server", default=DEFAULT_SERVER)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    parser.add_argument("--api-key", default=os.environ.get("NEXTSERVE_API_KEY"))
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    request = generation_pb2.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature,
                                             top_p=args.top_p)
    if args.seed is not None:
        request.seed = args.seed
    if args.chat:
        request.messages.append(generation_pb2.ChatMessage(role="user", content=args.prompt))
    else:
        request.text = args.prompt
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with grpc.insecure_channel(args.server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            final = None
            for chunk in stub.Generate(request, timeout=args.timeout, metadata=metadata):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                final = chunk
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            sys.exit(1)
    print()
    if final is not None:
        reason = generation_pb2.GenerateResponse.DESCRIPTOR.fields_by_name["finish_reason"].enum_type \
            .values_by_number[final.finish_reason].name.removeprefix("FINISH_REASON_").lower()
        print(f"[{reason}: {final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} generated tokens]",
              file=sys.stderr)


def check_health(server: str, service: str = "", timeout: float = 3.0) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def health_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="nextserve health", description="Exit 0 if the server is SERVING.")
    parser.add_argument("--server", default=DEFAULT_SERVER)
    parser.add_argument("--service", default="", help="health service name ('' for the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    healthy = check_health(args.server, args.service, args.timeout)
    print("SERVING" if healthy else "NOT_SERVING")
    sys.exit(0 if healthy else 1)
