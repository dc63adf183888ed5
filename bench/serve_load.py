"""Load on the chat endpoint (infer.py --serve): N concurrent clients x M requests each, against the same requests
sent one at a time, with the feedback agent and without it.

    python bench/serve_load.py --clients 4 --requests 2

The server runs in this process, as `infer.py --serve` runs it (nanowaltz/server.py around infer.chat_backend), on an
ephemeral port; the clients are threads speaking plain HTTP (http.client, one keep-alive connection each). Both
deployments share the loaded model: the two agents, and the conversation agent alone (--no-feedback). Each gets the
same N x M prompts of the eval split (spread over its categories), greedy, so the first answers are the same in both:
first one at a time from one client (sequential; both deployments), then from N clients at once, M requests each. Reported, as the
clients see it: latency percentiles, throughput (requests/s and generated tokens/s) and its gain over sequential
requests, and the feedback agent's overhead (the latency and throughput of both agents against the conversation
agent alone); from the trace, the FTR and the feedback agent's share of the agents' seconds.
"""
import http.client
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

sys.path = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from nanowaltz import cpu_threads  # noqa: F401,E402  (first: OpenMP reads its wait settings when torch loads)
from nanowaltz.base_model import DEFAULT_MODEL  # noqa: E402
from nanowaltz.cli import parse  # noqa: E402
from nanowaltz.models import load_agents_or_fresh  # noqa: E402
from nanowaltz.server import ChatServer  # noqa: E402
from infer import InferArgs, chat_backend, generation_limits  # noqa: E402


@dataclass
class LoadArgs:
    model: str = DEFAULT_MODEL  # base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path
    adapters: str | None = None  # trained adapters (train.py output); default: fresh adapters
    prompts: str = "data/prompts.jsonl"  # prompt file: its eval split, spread over the categories
    clients: int = 4  # N: concurrent clients
    requests: int = 2  # M: requests per client
    max_batch: int | None = None  # the server's --max-batch (default: N, so one batch can hold every client)
    max_new_tokens: int | None = None  # answer length limit (default: the training run's, else 128)
    feedback_max_new_tokens: int | None = None  # feedback JSON length limit (default: the training run's, else 96)
    out: str | None = None  # also write the numbers here as JSON


def percentile(values: list, q: float) -> float:
    """Nearest-rank percentile (a measured value, never an interpolation between two)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def send(connection, prompt: str) -> tuple:
    """One chat request: (seconds as the client saw them, the response)."""
    body = json.dumps({"model": "nanowaltz", "messages": [{"role": "user", "content": prompt}]})
    began = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    seconds = time.perf_counter() - began
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {payload}")
    return seconds, payload


def run_clients(server: ChatServer, prompts: list, clients: int) -> dict:
    """Send `prompts` from `clients` threads (client i sends prompts i, i + clients, ...); latencies, wall time and
    the responses."""
    results = [None] * len(prompts)

    def client(index):
        connection = http.client.HTTPConnection(*server.address, timeout=600)
        for i in range(index, len(prompts), clients):
            results[i] = send(connection, prompts[i])
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies = [seconds for seconds, _ in results]
    replies = [payload for _, payload in results]
    traces = [r["waltzrl"] for r in replies]
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    agent_seconds = sum(t["conversation_agent"]["seconds"] + t["feedback_agent"]["seconds"] for t in traces)
    return {"clients": clients, "requests": len(prompts), "wall_seconds": wall,
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies), "requests_per_second": len(prompts) / wall,
            "tokens_per_second": tokens / wall, "mean_tokens": tokens / len(prompts),
            "mean_batch_rows": statistics.fmean(t["batch_rows"] for t in traces),
            "mean_queue_seconds": statistics.fmean(t["queue_seconds"] for t in traces),
            "ftr": statistics.fmean(t["revised"] for t in traces),
            "feedback_share": sum(t["feedback_agent"]["seconds"] for t in traces) / agent_seconds,
            "answers": [r["choices"][0]["message"]["content"] for r in replies]}


def measure(model, tokenizer, args: LoadArgs, prompts: list) -> dict:
    """Both deployments on the same prompts and the same loaded model: the sequential runs of both, then the
    concurrent runs of both, so that a machine whose load changes during the run biases the comparison between the
    deployments less."""
    max_new, feedback_max_new = generation_limits(args.adapters, args.max_new_tokens, args.feedback_max_new_tokens)
    prefix_cache = {}  # the adapters do not change: both servers reuse the system prompts' keys/values
    servers = {}
    try:
        for name, feedback in (("both agents", True), ("conversation agent alone", False)):
            settings = InferArgs(model=args.model, adapters=args.adapters, feedback=feedback, max_new_tokens=max_new,
                                 feedback_max_new_tokens=feedback_max_new)
            servers[name] = ChatServer(chat_backend(model, tokenizer, settings, prefix_cache), port=0, log=False,
                                       queue_size=len(prompts), max_batch=args.max_batch or args.clients).start()
            warm_up = http.client.HTTPConnection(*servers[name].address, timeout=600)
            send(warm_up, prompts[0])  # one-off costs: the system prompts' keys/values, allocation
            warm_up.close()
        results = {name: {} for name in servers}
        for run, clients in (("sequential", 1), ("concurrent", args.clients)):
            for name, server in servers.items():
                results[name][run] = run_clients(server, prompts, clients)
                print(f"  {name}, {run}: {results[name][run]['wall_seconds']:.0f} s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return results


def format_results(results: dict, args: LoadArgs) -> str:
    lines = [f"{args.clients} clients x {args.requests} requests; latency as the clients see it, seconds",
             f"  {'deployment':26s} {'run':11s} {'p50':>6s} {'p90':>6s} {'p99':>6s} {'req/s':>6s} {'tok/s':>6s} "
             f"{'rows':>5s} {'FTR':>5s} {'fb share':>8s}"]
    for name, runs in results.items():
        for run, row in runs.items():
            lines.append(f"  {name:26s} {run:11s} {row['p50']:6.2f} {row['p90']:6.2f} {row['p99']:6.2f} "
                         f"{row['requests_per_second']:6.3f} {row['tokens_per_second']:6.1f} "
                         f"{row['mean_batch_rows']:5.2f} {100 * row['ftr']:4.0f}% {100 * row['feedback_share']:7.1f}%")
    both, alone = results["both agents"], results["conversation agent alone"]
    for name, runs in results.items():
        gain = runs["concurrent"]["requests_per_second"] / runs["sequential"]["requests_per_second"]
        lines.append(f"  {name}: concurrent throughput {gain:.2f}x sequential")
    for run in ("sequential", "concurrent"):
        lines.append(f"  feedback agent's overhead, {run}: p50 latency {both[run]['p50'] / alone[run]['p50']:.2f}x, "
                     f"mean latency {both[run]['mean'] / alone[run]['mean']:.2f}x, throughput "
                     f"{both[run]['requests_per_second'] / alone[run]['requests_per_second']:.2f}x of the "
                     "conversation agent alone")
    same = sum(a == b for a, b in zip(both["sequential"]["answers"], both["concurrent"]["answers"]))
    lines.append(f"  same answer sequential and concurrent (greedy): {same}/{len(both['sequential']['answers'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from nanowaltz.data import load_prompts, spread_over_categories

    args = parse(LoadArgs, "Load on infer.py --serve: N concurrent clients x M requests against sequential "
                           "requests, with and without the feedback agent.", argv)
    for name in ("clients", "requests"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    count = args.clients * args.requests
    prompts = [r["prompt"] for r in spread_over_categories(load_prompts(args.prompts, split="eval"), count)]
    if len(prompts) < count:
        raise SystemExit(f"--prompts {args.prompts}: {len(prompts)} eval prompts, {count} needed")
    model, tokenizer = load_agents_or_fresh(args.model, args.adapters)
    results = measure(model, tokenizer, args, prompts)
    print(format_results(results, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
