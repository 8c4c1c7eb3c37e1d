"""Load generator for the streaming `Generate` call: our own ghz, with faults mixed in.

    python benchmarks/load.py --server 127.0.0.1:50051 -c 16 -n 200 --max-tokens 32
    python benchmarks/load.py -c 16 -n 200 --cancel-rate 0.1 --deadline-rate 0.1 --bad-rate 0.1 --json
    python benchmarks/load.py --config docker/ghz/generate-c16.json     # a ghz config's workload

`-c` streams run at once until `-n` requests are done (ghz's -c and -n). It reports what ghz reports
(count, requests/s, latency to the end of the stream, status code distribution) plus time to first
token, inter-token latency and output tokens/s, as text or, with --json, as one JSON object. Each
request is planned up front from --seed: `ok`, or a fault at the given rates: `cancel` (the client
cancels after 0-2 chunks), `deadline` (a deadline between 1 ms and --deadline-s, so some finish in
time) or `bad` (a request the server must refuse with INVALID_ARGUMENT). Every request ends with one
status; the report counts them by status and by plan. Afterwards it reads GetModelInfo until the
server is idle and reports the free KV blocks and GDN slot groups (all of them, unless something leaked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format

from nextserve.v1 import generation_pb2, generation_pb2_grpc

R = generation_pb2.GenerateRequest
DEFAULT_PROMPT = "Tell me a story about a lighthouse keeper."
# Requests the router must refuse (INVALID_ARGUMENT), each naming a different field.
BAD_REQUESTS = [
    ("temperature", dict(temperature=-1.0)),
    ("top_p", dict(top_p=1.5)),
    ("max_tokens", dict(max_tokens=0)),
    ("token_ids", dict(token_ids=[10**9])),
    ("stop", dict(stop=[""])),
    ("logprobs", dict(logprobs=99)),
]


@dataclass
class Plan:
    kind: str  # ok | cancel | deadline | bad
    cancel_after_chunks: int = 0
    deadline_s: float | None = None
    bad: int = 0  # index into BAD_REQUESTS


@dataclass
class Result:
    kind: str
    code: str
    message: str = ""
    started: float = 0.0
    first_token: float | None = None
    ended: float = 0.0
    num_tokens: int = 0
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the previous chunk, tokens)

    @property
    def latency(self) -> float:
        return self.ended - self.started


def plan_requests(total: int, cancel_rate: float, deadline_rate: float, bad_rate: float, deadline_s: float,
                  seed: int) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for _ in range(total):
        x = rng.random()
        if x < cancel_rate:
            plans.append(Plan("cancel", cancel_after_chunks=rng.randrange(3)))
        elif x < cancel_rate + deadline_rate:
            plans.append(Plan("deadline", deadline_s=rng.uniform(0.001, deadline_s)))
        elif x < cancel_rate + deadline_rate + bad_rate:
            plans.append(Plan("bad", bad=rng.randrange(len(BAD_REQUESTS))))
        else:
            plans.append(Plan("ok"))
    return plans


def request_template(args: argparse.Namespace, data: dict | None) -> generation_pb2.GenerateRequest:
    """The request every plan starts from: a ghz config's `data`, or the flags; flags given win."""
    request = json_format.ParseDict(data, R()) if data else R(max_tokens=32, temperature=0.0, ignore_eos=True)
    if args.prompt is not None or not data:
        request.ClearField("messages")
        request.ClearField("token_ids")
        request.text = ""
        prompt = args.prompt or DEFAULT_PROMPT
        if args.chat:
            request.messages.append(generation_pb2.ChatMessage(role="user", content=prompt))
        else:
            request.text = prompt
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.ignore_eos is not None:
        request.ignore_eos = args.ignore_eos
    return request


def build_request(template: generation_pb2.GenerateRequest, plan: Plan, index: int, seed: int, run: str):
    """Request `index` of run `run` (ids must be unique among live requests, across concurrent runs too)."""
    request = R()
    request.CopyFrom(template)
    request.request_id = f"load-{run}-{index}"
    if request.temperature > 0 and not request.HasField("seed"):
        request.seed = seed * 1_000_003 + index
    if plan.kind == "bad":
        name, value = BAD_REQUESTS[plan.bad]
        if name == "token_ids":  # the one prompt field: replace the prompt
            request.ClearField("messages")
            request.text = ""
        for field_name, field_value in value.items():
            if isinstance(field_value, list):
                getattr(request, field_name).extend(field_value)
            else:
                setattr(request, field_name, field_value)
    return request


async def run_one(stub, request, plan: Plan, metadata, timeout: float) -> Result:
    result = Result(plan.kind, "OK", started=time.perf_counter())
    call = stub.Generate(request, timeout=plan.deadline_s or timeout, metadata=metadata)
    chunks = 0
    last = result.started
    try:
        if plan.kind == "cancel" and plan.cancel_after_chunks == 0:
            await asyncio.sleep(random.Random(request.request_id).uniform(0, 0.02))
            call.cancel()
        async for response in call:
            now = time.perf_counter()
            n = len(response.token_ids)
            if n:
                if result.first_token is None:
                    result.first_token = now
                else:
                    result.gaps.append((now - last, n))
                last = now
                result.num_tokens += n
            chunks += 1
            if plan.kind == "cancel" and chunks >= plan.cancel_after_chunks:
                call.cancel()
                break
        code = await call.code()
        result.code = code.name
        if code != grpc.StatusCode.OK:
            result.message = await call.details() or ""
    except asyncio.CancelledError:
        if not call.cancelled():
            raise
        result.code = "CANCELLED"
    except grpc.aio.AioRpcError as e:
        result.code, result.message = e.code().name, e.details() or ""
    result.ended = time.perf_counter()
    return result


async def run_load(args: argparse.Namespace) -> dict:
    plans = plan_requests(args.total, args.cancel_rate, args.deadline_rate, args.bad_rate, args.deadline_s, args.seed)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    channels = [grpc.aio.insecure_channel(args.server) for _ in range(args.connections)]
    stubs = [generation_pb2_grpc.GenerationStub(channel) for channel in channels]
    results: list[Result] = []
    next_index = iter(range(len(plans)))
    run = secrets.token_hex(4)

    async def worker(worker_index: int) -> None:
        stub = stubs[worker_index % len(stubs)]
        for index in next_index:
            plan = plans[index]
            request = build_request(args.template, plan, index, args.seed, run)
            results.append(await run_one(stub, request, plan, metadata, args.timeout))

    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), args.connect_timeout)
        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        wall = time.perf_counter() - started
        load = await idle_load(stubs[0], metadata) if args.check_load else None
    finally:
        for channel in channels:
            await channel.close()
    return summarize(args, results, wall, load)


async def idle_load(stub, metadata, timeout: float = 10.0) -> dict | None:
    """The server's load once nothing runs (aborts land at the next engine step), or the last seen."""
    deadline = time.monotonic() + timeout
    load = None
    while time.monotonic() < deadline:
        try:
            info = await stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=5, metadata=metadata)
        except grpc.aio.AioRpcError:
            return None
        load = info.load
        if (load.running_requests == 0 and load.waiting_requests == 0 and info.router_in_flight == 0
                and load.free_kv_blocks == load.total_kv_blocks
                and load.free_gdn_slot_groups == load.total_gdn_slot_groups):
            break
        await asyncio.sleep(0.1)
    return {name: getattr(load, name) for name in (
        "running_requests", "waiting_requests", "free_kv_blocks", "total_kv_blocks", "free_gdn_slot_groups",
        "total_gdn_slot_groups", "num_preemptions")}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"count": len(ordered), "min": ordered[0], "mean": sum(ordered) / len(ordered), "p50": at(50),
            "p90": at(90), "p95": at(95), "p99": at(99), "max": ordered[-1]}


def summarize(args: argparse.Namespace, results: list[Result], wall: float, load: dict | None) -> dict:
    ok = [r for r in results if r.code == "OK"]
    itl = [gap / n for r in ok for gap, n in r.gaps for _ in range(n)]
    tpot = [(r.ended - r.first_token) / (r.num_tokens - 1) for r in ok if r.first_token and r.num_tokens > 1]
    output_tokens = sum(r.num_tokens for r in results)
    by_kind: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r.kind, Counter())[r.code] += 1
    errors = Counter(f"{r.code}: {r.message}" for r in results if r.code != "OK")
    return {
        "server": args.server,
        "concurrency": args.concurrency,
        "count": len(results),
        "total_s": wall,
        "requests_per_s": len(results) / wall if wall else 0.0,
        "latency_s": percentiles([r.latency for r in ok]),
        "time_to_first_token_s": percentiles([r.first_token - r.started for r in ok if r.first_token]),
        "inter_token_latency_s": percentiles(itl),
        "time_per_output_token_s": percentiles(tpot),
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall if wall else 0.0,
        "status_codes": dict(Counter(r.code for r in results).most_common()),
        "by_plan": {kind: dict(codes.most_common()) for kind, codes in sorted(by_kind.items())},
        "errors": dict(errors.most_common(10)),
        "server_load_after": load,
    }


def format_text(summary: dict) -> str:
    def ms(stats: dict, key: str) -> str:
        return f"{stats[key] * 1000:.2f} ms" if stats else "-"

    latency = summary["latency_s"]
    lines = [
        "Summary:",
        f"  Count:        {summary['count']}",
        f"  Total:        {summary['total_s']:.2f} s",
        f"  Slowest:      {ms(latency, 'max')}",
        f"  Fastest:      {ms(latency, 'min')}",
        f"  Average:      {ms(latency, 'mean')}",
        f"  Requests/sec: {summary['requests_per_s']:.2f}",
        "",
        "Latency distribution (to the end of the stream, OK requests):",
        *(f"  {p} % in {ms(latency, f'p{p}')}" for p in (50, 90, 95, 99)),
        "",
        "Streaming (OK requests):",
    ]
    for title, key in (("time to first token", "time_to_first_token_s"),
                       ("inter-token latency", "inter_token_latency_s"),
                       ("time per output token", "time_per_output_token_s")):
        stats = summary[key]
        lines.append(f"  {title + ':':<23}p50 {ms(stats, 'p50')}, p90 {ms(stats, 'p90')}, p99 {ms(stats, 'p99')}")
    lines += [f"  output tokens:         {summary['output_tokens']} ({summary['output_tokens_per_s']:.1f} tokens/s)",
              "", "Status code distribution:"]
    lines += [f"  [{code}]{' ' * max(1, 20 - len(code))}{n} responses" for code, n in summary["status_codes"].items()]
    if len(summary["by_plan"]) > 1 or "ok" not in summary["by_plan"]:
        lines += ["", "By plan:"]
        lines += [f"  {kind:<9}" + ", ".join(f"{code} {n}" for code, n in codes.items())
                  for kind, codes in summary["by_plan"].items()]
    if summary["errors"]:
        lines += ["", "Error distribution:"]
        lines += [f"  [{n}] {message[:150]}" for message, n in summary["errors"].items()]
    load = summary["server_load_after"]
    if load:
        lines += ["", f"Server after the run: {load['running_requests']} running, {load['waiting_requests']} waiting, "
                      f"KV blocks free {load['free_kv_blocks']}/{load['total_kv_blocks']}, GDN slot groups free "
                      f"{load['free_gdn_slot_groups']}/{load['total_gdn_slot_groups']}"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a ghz JSON config (docker/ghz/*.json): its host, concurrency, total, "
                                         "connections, timeout and data; flags given here win")
    parser.add_argument("--server", help="host:port (default: $NEXTSERVE_SERVER or 127.0.0.1:50051)")
    parser.add_argument("-c", "--concurrency", type=int, help="streams at once (default 16)")
    parser.add_argument("-n", "--total", type=int, help="requests in all (default 200)")
    parser.add_argument("--max-tokens", type=int, help="default 32")
    parser.add_argument("--prompt", help=f"default {DEFAULT_PROMPT!r}")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    parser.add_argument("--temperature", type=float, help="default 0 (greedy)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction,
                        help="generate max_tokens every time (default on, so runs are comparable)")
    parser.add_argument("--cancel-rate", type=float, default=0.0, help="fraction of requests the client cancels")
    parser.add_argument("--deadline-rate", type=float, default=0.0, help="fraction with a short deadline")
    parser.add_argument("--deadline-s", type=float, default=0.2, help="longest of those deadlines")
    parser.add_argument("--bad-rate", type=float, default=0.0, help="fraction of invalid requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--connections", type=int, help="gRPC channels, used round robin (default 1)")
    parser.add_argument("--timeout", type=float, help="deadline of the other requests, seconds (default 300)")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--api-key", default=os.environ.get("NEXTSERVE_API_KEY"))
    parser.add_argument("--no-load-check", dest="check_load", action="store_false",
                        help="skip reading GetModelInfo after the run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    config = json.loads(open(args.config).read()) if args.config else {}
    if config and config.get("call", "").replace(".Generate", "/Generate") != "nextserve.v1.Generation/Generate":
        parser.error(f"{args.config}: only nextserve.v1.Generation/Generate is supported, not {config.get('call')!r}")
    defaults = {"server": config.get("host") or os.environ.get("NEXTSERVE_SERVER", "127.0.0.1:50051"),
                "concurrency": config.get("concurrency", 16), "total": config.get("total", 200),
                "connections": config.get("connections", 1),
                "timeout": _seconds(config["timeout"]) if "timeout" in config else 300.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.concurrency < 1 or args.total < 1 or args.connections < 1:
        parser.error("--concurrency, --total and --connections must be >= 1")
    rates = (args.cancel_rate, args.deadline_rate, args.bad_rate)
    if any(not 0 <= rate <= 1 for rate in rates) or sum(rates) > 1:
        parser.error("the rates must be in [0, 1] and add up to at most 1")
    try:
        args.template = request_template(args, config.get("data"))
    except json_format.ParseError as e:
        parser.error(f"{args.config}: data is not a GenerateRequest: {e}")
    return args


def _seconds(duration: str) -> float:
    """A ghz duration ("300s", "2m", "1h", "500ms") in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if duration.endswith(suffix) and duration[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(duration[: -len(suffix)]) * scale
    raise ValueError(f"not a duration: {duration!r}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        summary = asyncio.run(run_load(args))
    except asyncio.TimeoutError:
        sys.exit(f"could not connect to {args.server} in {args.connect_timeout:g} s")
    print(json.dumps(summary, indent=2) if args.json else format_text(summary))


if __name__ == "__main__":
    main()
