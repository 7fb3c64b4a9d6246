"""`StaticOptions`: the settings of captune's static loops (which parts run compiled, how often the host looks),
with the measurements that chose each default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StaticOptions:
    """How captune's static loops run a model; a model's are `fast_path(model).options` (the defaults until set).
    Each default is the one measured fastest (the result files in benchmarks/results/ named below)."""

    held_cache_rows: int = 8
    """The most rows (images x beams) whose static caches a `generate_from_pixels` call without `caches` (a single
    caption, a server's request) keeps on the model's fast path for the next one (~20 MB a row for OPT-2.7B and 30 new
    tokens): allocating them anew took ~2.4 ms of a single caption's host time on an H100 while the GPU waited
    (results/caption-single-latency-h100-cublas-trace.json), and the compiled steps' CUDA graphs read them at the
    addresses they were recorded with. Default 8."""

    compiled_image_side_up_to: int = 32
    """The largest batch whose image side the static loops run compiled (`decoder.compiled_image_side`). Measured on
    an H100: one image's image side took 32.7 ms eager (launch-bound) and 5.6 ms compiled, the single-image caption
    153 -> 137 ms (results/caption-profile-h100-single-compiled-image-side.json); at batch 512 the compiled one was
    slower (0.585 s against 0.553 s eager); batches between were not measured. Default 32."""

    compiled_prefill_up_to: int = 32
    """The largest batch (images) whose prefill the static loops run compiled with CUDA graphs
    (`decoder._compiled_prefill`); 0: always eager. Eager, the prefill is ~500 kernel launches, which at batch 1 keep
    the GPU waiting (~10 ms of host time by the H100 profile against a few ms of GPU work); compiled, a single caption
    took 119.3 ms against 132.2 (results/caption-single-latency-h100-compiled-prefill.json against -eager-prefill.json).
    At large batches its GEMMs are long and launches do not matter. Default 32."""

    compiled_step_up_to: int = 32
    """The most rows (images x beams) whose decode step runs compiled (transformers' compiled call: dynamo, Inductor,
    CUDA graph trees); more rows run `decoder.GraphedStep`, the eager step recorded as one CUDA graph, which needs no
    tracing or compiling: a first greedy call at 512 images took 4.4 s against 36.5 compiled, steady 1.137 s against
    1.136 (results/caption-warm-up-h200-graphed-step-first-process.json, -compiled-step-first-process.json). Small
    batches keep the compiled step, whose GEMV linears the single image's latency needs. Default 32."""

    gemv_up_to: int = 1
    """The most rows (tokens in a call) whose linear layers the compiled static loops compute as `linears._gemv`
    reductions (`linears.gemv_linears`), tuned by the compiler's coordinate descent; more rows go to cuBLAS
    (`F.linear`). 1: a single caption's decode step; 0 patches nothing. Measured on an H100 in alternate calls of one
    process, a single caption took 95.4 ms median against 101.7 with cuBLAS, faster at each of the 20 quantiles
    (results/caption-single-latency-h100-gemv-ab.json); its decode step 2.82 against 3.10 ms
    (results/caption-single-latency-h100-gemv-coordinate-descent.json). With the compiler's own reduction
    configurations they were slower than cuBLAS (3.13 against 3.05 ms a step;
    results/caption-single-latency-h100-gemv-default-configs.json). The cost: the first single caption of a process
    compiles ~60 s longer (the tuning: 130 against 72 s on an H100), the patched forwards add ~0.2 ms of guard checks
    to each compiled call, and the tuned step varies between processes (2.72-2.92 ms in the first process on a
    machine, 2.88-3.42 in later ones; cuBLAS 3.00-3.10). Default 1."""

    reductions_up_to: int = 32
    """The most rows whose one-query attention is `attention._reductions` when compiled (more, and eager:
    `attention._batched_products`). At batch 1 a decode step took 2.60 ms against 2.70 with the batched products on an
    H200 (results/caption-single-latency-h200-reduction-attention.json against -product-attention.json); at batch 512
    it was slower (results/caption-profile-h100-b512-reduction-attention.json). Default 32."""

    check_every: int = 8
    """Decode steps between the static loops' checks whether generation has ended (`loops._check_at`): each check
    waits for the GPU, so the host cannot queue the next steps while it looks (`generate` looks after every step).
    Not measured against other values. Default 8."""
