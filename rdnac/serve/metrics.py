"""Serving metrics, rendered in the Prometheus text format (version 0.0.4) for `GET /metrics`.

The engine thread updates counters and histograms and snapshots the engine's
gauges after every step; the HTTP thread only renders. Plain ints and lists
under one lock: no prometheus_client dependency.
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

    def render(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
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

    def on_finished(self, reason: str, seconds: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.latency.observe(seconds)

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
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
