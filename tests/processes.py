"""Child processes as /proc shows them, to check that nothing outlives what started it."""

from pathlib import Path


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (exited, not yet reaped) or a vanished pid is not alive."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_pids(pid: int) -> list[int]:
    """Tensor-parallel ranks started by `pid` (still in /proc, zombies included)."""
    return [child for child in child_pids(pid) if "worker.parallel.rank_main" in cmdline(child)]
