"""Run the GPU tests so that one fault cannot fail the rest: each test file in its own process, and
the tests of a file whose process hit a CUDA error again one per process.

    python tests/gpu/run_suite.py [--out FILE] [paths...]

A CUDA fault (an illegal memory access) poisons the context, so every later test of its process
fails too; rerunning those one by one tells the faulty test from the ones it took down. Writes a
JSON summary: per file the pytest counts, and the outcome of every rerun test.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_FAULT = re.compile(r"CUDA error|illegal memory access|device-side assert|CUBLAS_STATUS|cudaErrorLaunchFailure")


def gpu_test_files(paths: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", *paths],
                         cwd=ROOT, capture_output=True, text=True).stdout
    files = []
    for line in out.splitlines():
        if "::" in line:
            name = line.split("::")[0]
            if name not in files:
                files.append(name)
    return files


def run_pytest(args: list[str], timeout: int = 1200) -> tuple[int, str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        return -1, f"timeout after {timeout}s\n{e.stdout or ''}"


def failed_ids(output: str) -> list[str]:
    return sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+::\S+)", output, re.M)})


def summary_line(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return lines[-1] if lines else output.strip().splitlines()[-1] if output.strip() else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report, all_green = [], True
    for path in gpu_test_files(args.paths):
        start = time.time()
        code, output = run_pytest([path])
        entry = dict(file=path, returncode=code, summary=summary_line(output), seconds=round(time.time() - start, 1))
        print(f"{path}: {entry['summary']} ({entry['seconds']} s)", flush=True)
        if code != 0:
            fails = failed_ids(output)
            entry["failed"] = fails
            entry["tail"] = output[-3000:]
            if CUDA_FAULT.search(output):
                entry["reruns"] = {}
                for test_id in fails:
                    rc, out = run_pytest([test_id], timeout=600)
                    entry["reruns"][test_id] = "passed" if rc == 0 else summary_line(out)
                    print(f"  rerun alone {test_id}: {entry['reruns'][test_id]}", flush=True)
                    if rc != 0:
                        print(out[-2000:], flush=True)
            all_green = False
            if "reruns" not in entry:
                print(output[-4000:], flush=True)
        report.append(entry)
        if args.out:  # after every file, so a run cut short still leaves what it saw
            Path(args.out).write_text(json.dumps(dict(files=report, all_green=all_green), indent=1))
    print("ALL GREEN" if all_green else "NOT GREEN")
    sys.exit(0 if all_green else 1)


if __name__ == "__main__":
    main()
