"""Serving metrics, rendered in the Prometheus text format (version 0.0.4) for `GET /metrics`.

The engine thread updates counters and histograms and snapshots the engine's
gauges after every step; the HTTP thread only renders. Plain ints and lists
under one lock: no prometheus_client dependency.

rdnac's own series (`rdnac_*`) come first; then the same facts under vLLM's
names and label conventions (`vllm:*`, labels `model_name` and `engine`;
counters end in `_total` as prometheus_client exposes them), so dashboards
and alerts written for vLLM read rdnac unchanged.
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        """Sample lines; `labels` (`a="x",b="y"`) go on every one, before `le`."""
        lines, cumulative = [], 0
        prefix = labels + "," if labels else ""
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{{prefix}le="{bound}"}} {cumulative}')
        tail = f"{{{labels}}}" if labels else ""
        lines += [f'{name}_bucket{{{prefix}le="+Inf"}} {self.count}', f"{name}_sum{tail} {self.sum:.6f}",
                  f"{name}_count{tail} {self.count}"]
        return lines


class ServeMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.finished: dict[str, int] = {}  # by finish reason
        self.num_rejected = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.gauges = {"running": 0, "waiting": 0, "kv_blocks_free": 0, "kv_blocks_total": 0, "preemptions": 0}
        self.latency = Histogram()
        self.time_to_first_token = Histogram()
        self.vllm = VllmSeries()

    def on_admitted(self, num_prompt_tokens: int) -> None:
        with self._lock:
            self.num_prompt_tokens += num_prompt_tokens

    def on_rejected(self) -> None:
        with self._lock:
            self.num_rejected += 1

    def on_tokens(self, num_tokens: int) -> None:
        with self._lock:
            self.num_generation_tokens += num_tokens

    def on_first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)
            self.vllm.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        with self._lock:
            self.vllm.itl.observe(seconds)

    def on_queued(self, seconds: float) -> None:
        """Arrival to the first step that schedules the request."""
        with self._lock:
            self.vllm.queue.observe(seconds)

    def on_finished(self, reason: str, seconds: float, num_tokens: int = 0, ttft: float | None = None) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.latency.observe(seconds)
            self.vllm.e2e.observe(seconds)
            if num_tokens > 1 and ttft is not None:  # vLLM's TPOT: decode time over the tokens after the first
                self.vllm.tpot.observe((seconds - ttft) / (num_tokens - 1))

    def set_gauges(self, **values: int) -> None:
        with self._lock:
            self.gauges.update(values)

    def render(self, model_name: str) -> str:
        with self._lock:
            g = dict(self.gauges)
            scalars = [
                ("rdnac_requests_running", "gauge", "Requests scheduled on the engine (prefill or decode).", g["running"]),
                ("rdnac_requests_waiting", "gauge", "Requests queued for admission.", g["waiting"]),
                ("rdnac_requests_rejected_total", "counter", "Requests the engine refused (e.g. prompt too long).",
                 self.num_rejected),
                ("rdnac_prompt_tokens_total", "counter", "Prompt tokens admitted.", self.num_prompt_tokens),
                ("rdnac_generation_tokens_total", "counter", "Tokens generated.", self.num_generation_tokens),
                ("rdnac_kv_blocks_free", "gauge", "Free paged-KV-cache blocks.", g["kv_blocks_free"]),
                ("rdnac_kv_blocks_total", "gauge", "Paged-KV-cache blocks in all.", g["kv_blocks_total"]),
                ("rdnac_preemptions_total", "counter", "Sequences preempted to free KV blocks.", g["preemptions"]),
            ]
            lines = ["# HELP rdnac_model_info The model being served.", "# TYPE rdnac_model_info gauge",
                     f'rdnac_model_info{{model="{_escape(model_name)}"}} 1']
            for name, kind, help_text, value in scalars:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            name = "rdnac_requests_finished_total"
            lines += [f"# HELP {name} Requests finished, by finish reason.", f"# TYPE {name} counter"]
            for reason in sorted(set(self.finished) | {"stop", "length", "abort", "error"}):
                lines.append(f'{name}{{finish_reason="{reason}"}} {self.finished.get(reason, 0)}')
            for name, help_text, hist in [
                ("rdnac_request_latency_seconds", "Arrival to last token, per finished request.", self.latency),
                ("rdnac_time_to_first_token_seconds", "Arrival to first token.", self.time_to_first_token),
            ]:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.render(name)]
            lines += self.vllm.render(model_name, g, self.num_prompt_tokens, self.num_generation_tokens, self.finished)
        return "\n".join(lines) + "\n"


# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram_quantile over either server compares alike
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class VllmSeries:
    """The histograms only the vLLM-named series have; the rest are rdnac's counts under vLLM's names."""

    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.tpot = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_BUCKETS)
        self.queue = Histogram(REQUEST_BUCKETS)

    def render(self, model_name: str, g: dict, num_prompt: int, num_generation: int, finished: dict) -> list[str]:
        labels = f'model_name="{_escape(model_name)}",engine="0"'
        used = 1 - g["kv_blocks_free"] / g["kv_blocks_total"] if g["kv_blocks_total"] else 0.0
        scalars = [
            ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", g["running"]),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", g["waiting"]),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", round(used, 6)),
            ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried "
             "tokens.", g.get("prefix_cache_queries", 0)),
            ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
             g.get("prefix_cache_hits", 0)),
            ("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
             g["preemptions"]),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", num_prompt),
            ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", num_generation),
        ]
        lines = []
        for name, kind, help_text, value in scalars:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
        name = "vllm:request_success_total"
        lines += [f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter"]
        for reason in ("stop", "length", "abort"):  # vLLM's finished_reason values; errors are not successes
            lines.append(f'{name}{{{labels},finished_reason="{reason}"}} {finished.get(reason, 0)}')
        for name, help_text, hist in [
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            # vLLM's older name for the inter-token latency, kept by dashboards built before the rename
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds (deprecated "
             "name of vllm:inter_token_latency_seconds).", self.itl),
            ("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per "
             "request.", self.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", self.queue),
        ]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.render(name, labels)]
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
