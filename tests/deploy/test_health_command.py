"""`nextserve health`, the containers' health check: exit 0 only while the server reports SERVING."""

from tests.deploy.conftest import run_health
from tests.serving.conftest import Process, free_port


def test_serving_worker_and_router_exit_0(stack):
    for address in (stack.worker_address, stack.router_address):
        done = run_health(address)
        assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    done = run_health(stack.router_address, "--service", "nextserve.v1.Generation")
    assert done.returncode == 0


def test_not_serving_and_stopped_servers_exit_1(builtin_model, tmp_path):
    port, nobody = free_port(), free_port()
    # A router whose worker never comes is up but NOT_SERVING (what compose sees while a worker restarts).
    router = Process(["router", "--host", "127.0.0.1", "--port", str(port), "--model", str(builtin_model),
                      "--worker", f"127.0.0.1:{nobody}"], tmp_path / "router.log")
    try:
        assert _wait_until_listening(router, f"127.0.0.1:{port}")
        done = run_health(f"127.0.0.1:{port}")
        assert (done.returncode, done.stdout.strip()) == (1, "NOT_SERVING")
    finally:
        router.stop()
    done = run_health(f"127.0.0.1:{port}")  # nothing listens any more
    assert (done.returncode, done.stdout.strip()) == (1, "NOT_SERVING")
    assert run_health(f"127.0.0.1:{nobody}").returncode == 1


def _wait_until_listening(process: Process, address: str, timeout: float = 30.0) -> bool:
    import time

    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.proc.poll() is None, process.output()
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return True
            except grpc.FutureTimeoutError:
                pass
    return False
