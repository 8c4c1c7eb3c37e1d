"""RouterConfig validation, flag/environment parsing, and admission bounds."""

import asyncio

import pytest

from router.admission import Admission
from router.config import RouterConfig
from router.errors import InvalidArgument, ResourceExhausted
from router.main import config_from_args


def test_config_refuses_nonsense_with_the_field_name(model_dir, tmp_path):
    ok = dict(model=str(model_dir), workers=["localhost:50061"])
    RouterConfig(**ok)
    for change, needle in [
        (dict(model=str(tmp_path)), "no tokenizer.json"),
        (dict(workers=[]), "workers"),
        (dict(workers=["nohost"]), "host:port"),
        (dict(workers=["h:99999"]), "port must be in 1..65535"),
        (dict(workers=["h:1", "h:1"]), "duplicate"),
        (dict(port=70000), "port"),
        (dict(max_in_flight=0), "max_in_flight"),
        (dict(max_queue=-1), "max_queue"),
        (dict(tls_cert="/x.pem"), "tls_cert and tls_key go together"),
        (dict(tls_cert="/nope.pem", tls_key="/nope.key"), "no such file"),
        (dict(reconnect_min_s=5.0, reconnect_max_s=1.0), "reconnect_max_s"),
        (dict(api_key="  "), "api_key"),
        (dict(log_level="LOUD"), "log_level"),
    ]:
        with pytest.raises(ValueError, match=needle):
            RouterConfig(**{**ok, **change})


def test_ipv6_worker_address(model_dir):
    assert RouterConfig(model=str(model_dir), workers=["[::1]:50061"]).worker_addresses == [("[::1]", 50061)]


def test_environment_then_flags(model_dir, monkeypatch):
    monkeypatch.setenv("NEXTSERVE_ROUTER_MODEL", str(model_dir))
    monkeypatch.setenv("NEXTSERVE_ROUTER_WORKERS", "a:1, b:2")
    monkeypatch.setenv("NEXTSERVE_ROUTER_PORT", "6000")
    monkeypatch.setenv("NEXTSERVE_ROUTER_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("NEXTSERVE_ROUTER_API_KEY", "k")
    config = config_from_args([])
    assert (config.workers, config.port, config.max_in_flight, config.api_key) == (["a:1", "b:2"], 6000, 7, "k")
    config = config_from_args(["--port", "0", "--worker", "c:3", "--max-queue", "5", "--drain-s", "0.5"])
    assert (config.workers, config.port, config.max_queue, config.drain_s) == (["c:3"], 0, 5, 0.5)


def test_bad_flag_or_environment_exits_with_a_message(model_dir, monkeypatch, capsys):
    monkeypatch.setenv("NEXTSERVE_ROUTER_PORT", "abc")
    with pytest.raises(SystemExit):
        config_from_args(["--model", str(model_dir), "--worker", "a:1"])
    assert "--port: invalid int value: 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("NEXTSERVE_ROUTER_PORT")
    with pytest.raises(SystemExit):
        config_from_args(["--model", str(model_dir)])
    assert "workers: give at least one worker address" in capsys.readouterr().err


def test_admission_bounds_and_duplicate_ids():
    async def scenario():
        admission = Admission(max_in_flight=1, max_queue=1)
        release = asyncio.Event()
        entered = []

        async def request(request_id):
            async with admission.admit(request_id):
                entered.append(request_id)
                await release.wait()

        first = asyncio.create_task(request("a"))
        await asyncio.sleep(0)
        second = asyncio.create_task(request("b"))
        await asyncio.sleep(0)
        assert (admission.num_in_flight, admission.num_waiting, entered) == (1, 1, ["a"])
        with pytest.raises(ResourceExhausted, match="1 requests in flight, 1 queued"):
            async with admission.admit("c"):
                pass
        with pytest.raises(InvalidArgument, match="already in flight"):
            async with admission.admit("b"):
                pass
        second.cancel()  # a cancelled waiter leaves the queue
        await asyncio.sleep(0)
        assert admission.num_waiting == 0
        release.set()
        await first
        assert (admission.num_in_flight, admission.num_waiting) == (0, 0)
        async with admission.admit("a"):  # ids are free again once done
            pass

    asyncio.run(scenario())
