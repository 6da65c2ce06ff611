"""The benchmark table: ``python -m fastunet.bench`` (``cli``) times the reference U-Net (eager, torch.compile)
against fastunet (exact, fast; on the CPU its inference snapshots, ``snapshots``) and, with ``--peers``, other
runtimes of the reference (``peers``); ``configs`` builds
and measures the rows, ``timing`` times them, ``table`` prints the table and draws the chart. The names other code
uses are importable from here; the error measures live in fastunet.testing."""

from ..testing import bn_cancelled_biases, parameter_grads, relative_error
from .cli import main, parse_args, print_explanations
from .configs import (
    COMPILED,
    CONFIGS,
    IMG_CH,
    N_BATCHES,
    OUTPUT_CH,
    build_model,
    cpu_memory_worker,
    cpu_peak_memory,
    initial_state,
    make_steps,
    random_batches,
    reference_flops,
)
from .peers import PEERS, onnxruntime_refusal, onnxruntime_session
from .snapshots import SNAPSHOTS
from .table import PEAK_PRECISION, table_legend
from .timing import interleaved_median_ms, matmul_peak_tflops, median_ms, peak_in_tf32

__all__ = [
    "COMPILED", "CONFIGS", "IMG_CH", "N_BATCHES", "OUTPUT_CH", "PEAK_PRECISION", "PEERS", "SNAPSHOTS",
    "bn_cancelled_biases",
    "build_model", "cpu_memory_worker", "cpu_peak_memory", "initial_state", "interleaved_median_ms", "main",
    "make_steps", "matmul_peak_tflops", "median_ms", "onnxruntime_refusal", "onnxruntime_session", "parameter_grads",
    "parse_args", "peak_in_tf32", "print_explanations", "random_batches", "reference_flops", "relative_error",
    "table_legend",
]
