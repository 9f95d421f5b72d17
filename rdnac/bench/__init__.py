"""Measurement tools behind `rdnac bench`: they sit after the runtime and drive it from outside.

`serving` measures TTFT/TPOT/throughput through the LLM engine (any device);
`decode` and `prefill` time single steps of a loaded plan on the GPU, with
the byte and FLOP accounting behind BENCHMARKS.md's bandwidth and TFLOP/s
figures; `profile` attributes a step's time to graph nodes; `peers` runs
transformers on the same checkpoint; `harness` ties them together over a
random checkpoint of a named shape (`rdnac.testing.fp8`), compiling it too,
and `families` does the same for the MoE, hybrid and MLA shapes;
`tune_shapes` builds tuning tables from model shapes; `serve_client` loads
any OpenAI-compatible server over HTTP (`rdnac bench serve`, vLLM's result
keys). Like the CLI, this
package may import both the compiler and the runtime.
"""
