"""Flags and environment variables map one to one, and both READMEs' tables say so."""

import re

import pytest

from tests.deploy.conftest import REPO


def _pairs(parser) -> list[tuple[tuple[str, ...], str]]:
    """(option strings, environment variable) of every option, read from --help."""
    pairs = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        match = re.search(r"\(env (NEXTSERVE_\w+)", action.help or "")
        assert match, f"{action.option_strings} names no environment variable in --help"
        pairs.append((tuple(action.option_strings), match.group(1)))
    return pairs


def _parsers():
    from router.main import build_parser as router_parser
    from worker.server.main import build_parser as worker_parser

    return {"worker": worker_parser(), "router": router_parser()}


def test_one_environment_variable_per_flag():
    for name, parser in _parsers().items():
        names = [env for _, env in _pairs(parser)]
        assert len(names) == len(set(names)), name


@pytest.mark.parametrize("readme", ["README.md", "docker/README.md"])
def test_readme_tables_list_every_flag_with_its_variable(readme):
    text = (REPO / readme).read_text()
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `-") and len(cells) >= 2:
            rows.setdefault(cells[0], set()).add(cells[1])
    for name, parser in _parsers().items():
        for flags, env in _pairs(parser):
            key = " / ".join(f"`{flag}`" for flag in flags)
            assert f"`{env}`" in rows.get(key, set()), f"{readme}: no row for {name} {key} ↔ {env}"


def test_environment_sets_what_the_flag_would(monkeypatch, tmp_path):
    from router.main import config_from_args
    from worker.server.main import parse_args

    monkeypatch.setenv("NEXTSERVE_WORKER_METRICS_PORT", "9999")
    monkeypatch.setenv("NEXTSERVE_SPECULATIVE_TOKENS", "3")
    args = parse_args([])
    assert (args.metrics_port, args.speculative_tokens) == (9999, 3)
    assert parse_args(["--metrics-port", "1234"]).metrics_port == 1234
    monkeypatch.delenv("NEXTSERVE_WORKER_METRICS_PORT")
    assert parse_args([]).metrics_port is None  # metrics are off unless asked for

    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("NEXTSERVE_ROUTER_METRICS_PORT", "9051")
    config = config_from_args(["--model", str(tmp_path), "--worker", "localhost:1"])
    assert config.metrics_port == 9051
    monkeypatch.setenv("NEXTSERVE_ROUTER_METRICS_PORT", "70000")
    with pytest.raises(SystemExit):
        config_from_args(["--model", str(tmp_path), "--worker", "localhost:1"])
