"""The benchmark table: ``python -m fastunet.bench`` (fastunet.bench.cli) times the reference U-Net (eager,
torch.compile) against fastunet (exact, fast) and, with ``--peers``, other runtimes of the reference. The names
other code uses are importable from here."""

from .cli import (
    COMPILED,
    CONFIGS,
    IMG_CH,
    N_BATCHES,
    OUTPUT_CH,
    PEAK_PRECISION,
    PEERS,
    bn_cancelled_biases,
    build_model,
    cpu_memory_worker,
    cpu_peak_memory,
    initial_state,
    interleaved_median_ms,
    main,
    make_steps,
    matmul_peak_tflops,
    median_ms,
    onnxruntime_refusal,
    onnxruntime_session,
    parameter_grads,
    parse_args,
    peak_in_tf32,
    print_explanations,
    random_batches,
    reference_flops,
    relative_error,
    table_legend,
)

__all__ = [
    "COMPILED", "CONFIGS", "IMG_CH", "N_BATCHES", "OUTPUT_CH", "PEAK_PRECISION", "PEERS", "bn_cancelled_biases",
    "build_model", "cpu_memory_worker", "cpu_peak_memory", "initial_state", "interleaved_median_ms", "main",
    "make_steps", "matmul_peak_tflops", "median_ms", "onnxruntime_refusal", "onnxruntime_session", "parameter_grads",
    "parse_args", "peak_in_tf32", "print_explanations", "random_batches", "reference_flops", "relative_error",
    "table_legend",
]
