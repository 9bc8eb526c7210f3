"""`gesso serve` under load while a job trains: 50 clients streaming the job's events (server-sent events) and 200
status requests a second (GET /jobs/{id}) for 30 s; the status requests' p50/p99 latency, and the job's step time
against the same job trained with no clients, before and after the loaded run (two baselines: the noise).

    python -m benchmarks.serve_load                 # the demo job on tiny-sdxl, 64 px; writes nothing but its report
    python -m benchmarks.serve_load --out R.json    # the figures as JSON too

A benchmark, not a test: pytest does not collect it (it collects bench_*.py). The load generator runs in this process
(raw HTTP/1.1 on asyncio streams), the server and the job in theirs, all on the same machine: on a small CPU machine
they compete for its cores, and the step-time cost includes the load generator's own share. The server's CPU time
over the window (/proc) is reported too: what the load costs the server itself.
"""
import argparse
import asyncio
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
JOB = {"config": (ROOT / "tests" / "data" / "demo.toml").read_text(), "base": str(ROOT / "tests" / "data"),
       "overrides": ["dataset.repeats=1", "dataset.resolution=64", "train.epochs=100", "sample.prompts=[]",
                     "output.tensorboard=false", "output.save_every_n_epochs=0", "output.save_state=false"]}
WARMUP_STEPS = 3  # the first steps pay for the caches and allocator
CONNECTIONS = 32  # keep-alive connections the status requests take turns on


def start_server(data: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # the job's torch threads (the server passes its environment on)
    proc = subprocess.Popen([sys.executable, "-m", "gesso.cli", "serve", "--port", "0", "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    line = proc.stdout.readline()
    if not line.startswith("gesso serve: http://"):
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stdout.read()}")
    return proc, line.split()[2]


def step_times(client: httpx.Client, job: int) -> list[float]:
    """Seconds per step of each of the ended job's steps after the warm-up ones, from its step events (`steps_per_s`:
    the time since the step before, the event's own recording included)."""
    times = []
    with client.stream("GET", f"/jobs/{job}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["event"] == "step" and event["step"] > WARMUP_STEPS:
                    times.append(1.0 / event["steps_per_s"])
    return times


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cost(url: str, server: int, job: int, n: int = 1000) -> float:
    """Milliseconds of server CPU per status request, `n` of them one after another with no job training."""
    async def run() -> None:
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(n):
            await get(reader, writer, f"GET /jobs/{job} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        writer.close()

    cpu = cpu_seconds(server)
    asyncio.run(run())
    return 1000 * (cpu_seconds(server) - cpu) / n


def train_for(client: httpx.Client, server: int, seconds: float, load=None) -> dict:
    """Queue the job, wait for its first steps, hold `load` (a coroutine function of the job id) or nothing for
    `seconds`, stop the job; its step times over those seconds, the server's CPU time and what the load measured."""
    job = client.post("/jobs", json=JOB).json()["id"]
    while (client.get(f"/jobs/{job}").json()["step"] or 0) <= WARMUP_STEPS:
        time.sleep(0.5)
    first, cpu = client.get(f"/jobs/{job}").json()["step"], cpu_seconds(server)
    measured = asyncio.run(load(job, seconds)) if load else time.sleep(seconds) or {}
    cpu = cpu_seconds(server) - cpu
    last = measured.pop("last_step", None) or client.get(f"/jobs/{job}").json()["step"]
    client.post(f"/jobs/{job}/stop")
    while client.get(f"/jobs/{job}").json()["status"] == "running":
        time.sleep(0.5)
    window = step_times(client, job)[first - WARMUP_STEPS:last - WARMUP_STEPS]  # the steps inside the measured seconds
    return {"job": job, "steps": len(window), "median_step_s": statistics.median(window),
            "server_cpu_s_per_s": cpu / seconds, **measured}


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[bytes, bytes]:
    """One request on a keep-alive connection: the response's head and body (uvicorn gives JSON a Content-Length)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    return head, await reader.readexactly(length)


def load(host: str, port: int, clients: int, rate: float):
    """The load, as a coroutine function of the job id and the seconds: `clients` event streams from the job's first
    event, and `rate` status requests a second on schedule over CONNECTIONS keep-alive connections. Raw HTTP/1.1 on
    asyncio streams, not an HTTP client library: a request costs this process a few microseconds, so the figures are
    the server's, not the load generator's."""
    async def run(job: int, seconds: float) -> dict:
        request = f"GET /jobs/{job} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        due_times: asyncio.Queue = asyncio.Queue()
        latencies, waits, failed, last_step, received = [], [], 0, 0, [0] * clients

        async def status_connection() -> None:
            nonlocal failed, last_step
            reader, writer = await asyncio.open_connection(host, port)
            while (due := await due_times.get()) is not None:
                began = time.perf_counter()
                head, body = await get(reader, writer, request)
                latencies.append(time.perf_counter() - began)  # the server's answer, from the request sent
                waits.append(time.monotonic() - due)  # from when it was due: a wait for a free connection included
                failed += not head.startswith(b"HTTP/1.1 200")
                if time.monotonic() <= stop:
                    last_step = max(last_step, json.loads(body)["step"])
            writer.close()

        async def stream(i: int) -> None:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /jobs/{job}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            async for line in reader:
                received[i] += line.startswith(b"data: ")

        start = time.monotonic()
        stop = start + seconds
        streams = [asyncio.create_task(stream(i)) for i in range(clients)]
        connections = [asyncio.create_task(status_connection()) for _ in range(CONNECTIONS)]
        due = start
        while due < stop:  # one request every 1/rate s, on schedule, whether or not the last ones have answered
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due_times.put_nowait(due)
            due += 1.0 / rate
        for _ in connections:
            due_times.put_nowait(None)
        await asyncio.gather(*connections)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        q, w = statistics.quantiles(latencies, n=100), statistics.quantiles(waits, n=100)
        return {"last_step": last_step, "status_requests": len(latencies), "status_failed": failed,
                "status_per_s": len(latencies) / seconds, "status_p50_ms": 1000 * q[49], "status_p99_ms": 1000 * q[98],
                "status_from_due_p50_ms": 1000 * w[49], "status_from_due_p99_ms": 1000 * w[98], "sse_clients": clients,
                "sse_events_min": min(received), "sse_events_max": max(received)}
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rate", type=float, default=200.0, help="status requests per second")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the job (default 1: on a small shared "
                                                          "machine more threads stall each other)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "data", args.threads)
        try:
            with httpx.Client(base_url=url, timeout=60.0) as client:
                rows = {"baseline": train_for(client, proc.pid, args.seconds)}
                rows["idle_server_cpu_ms_per_status_request"] = idle_cost(url, proc.pid, rows["baseline"]["job"])
                rows["loaded"] = train_for(client, proc.pid, args.seconds, load(*address(url), args.clients, args.rate))
                rows["baseline_after"] = train_for(client, proc.pid, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    base = statistics.mean([rows["baseline"]["median_step_s"], rows["baseline_after"]["median_step_s"]])
    report = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "job_threads": args.threads,
              "uvicorn_http": "httptools" if importlib.util.find_spec("httptools") else "h11", "seconds": args.seconds,
              **rows, "step_time_cost": rows["loaded"]["median_step_s"] / base - 1}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
