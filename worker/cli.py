"""`nextserve`: one command per verb. Heavy imports stay inside the commands, so `nextserve router`,
`generate` and `health` run without torch."""

import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    verbs = {
        "serve": ("start a worker and a router on this host", _serve),
        "worker": ("run worker rank 0 (the Engine service) alone", _worker),
        "router": ("run the public gRPC router alone", _router),
        "generate": ("stream a generation from a running server", _generate),
        "health": ("exit 0 if a server reports SERVING (for container health checks)", _health),
    }
    if not argv or argv[0] not in verbs:
        lines = "\n".join(f"  {name:<10}{help_}" for name, (help_, _) in verbs.items())
        print(f"usage: nextserve <command> [options]\n\ncommands:\n{lines}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    verbs[argv[0]][1](argv[1:])


def _serve(argv):
    from worker.launcher import serve_main

    serve_main(argv)


def _worker(argv):
    from worker.server.main import main as worker_main

    worker_main(argv)


def _router(argv):
    from router.main import main as router_main

    router_main(argv)


def _generate(argv):
    from worker.client import generate_main

    generate_main(argv)


def _health(argv):
    from worker.client import health_main

    health_main(argv)


if __name__ == "__main__":
    main()
