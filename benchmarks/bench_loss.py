"""Cost of the BCLS losses against VSE++'s hardest-negative triplet loss (forward + backward).

For each batch size B it times, in this one process, one training step of the loss head:
``sim = img @ txt.T`` (random L2-normalised float32 embeddings of dim 256) followed by the loss of both directions and
``backward()``. Cases:

* VSE++ triplet          ``bcls_loss(objective="vse")``
* Triplet-SN             ``bcls_loss(objective="triplet_sn")``
* Kendall SW-HS          BCLSConfig's defaults (window, label gap, hinge, hard mining), both directions,
                         *including* the label-side sorts
* BCLS total             ``relevance_sort_order`` of both directions (label side) + ``bcls_loss`` with defaults
* All-pairs Kendall      ``window_size=None, hard_mining=False`` (O(B^3); only B <= 512)
* Label side only        the labels-only part of BCLS total: both directions' sorts and window starts (no ``sim``);
                         ``BCLS total - Label side only`` is what remains in the loss when a collator precomputes it
* ... (torch path)       Kendall SW-HS and BCLS total on the pure-torch Kendall path (the compiled kernels switched
                         off), which is what runs on GPU tensors: its CPU cost here, for comparison

Time is the median over repeats, cases interleaved round-robin (rotating the order each round) so that load from
other processes hits all cases alike; the slow all-pairs case is timed separately, with a third of the repeats.
Every thread count of ``--threads`` (default: 1 and torch's default) gets its own table rows, each against VSE++ at
that thread count. With 1 thread the time is the CPU time of the (only) working thread (``time.thread_time``), which
stays meaningful on a machine shared with other jobs; otherwise it is wall-clock time (the Kendall kernels split
their rows over the same threads as torch).
Peak memory is measured in a fresh subprocess per case: the increase of the resident set (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus ``VmRSS`` before) over one step, with glibc told to ``mmap`` every allocation
of 4 KiB or more (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once. It counts
``sim``, its gradient and every intermediate of the step, not the inputs.

    python benchmarks/bench_loss.py [--sizes 128 512 2048 4096] [--threads 1 2] [--no-memory]
    BCLS_DISABLE_NUMBA=1 python benchmarks/bench_loss.py ...     # every Kendall case on the pure-torch path
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeling_bcls import BCLSConfig, loss_kendall  # noqa: E402
from modeling_bcls.losses.loss_kendall import kendall_ranking_loss  # noqa: E402
from modeling_bcls.losses import bcls_loss, relevance_sort_order  # noqa: E402


DIM = 256
ALL_PAIRS_MAX_B = 512
NUM_IMAGES = 6000  # pairs are drawn from a Flickr8k-sized pool: a few images repeat in large batches
REPEATS = {128: 30, 512: 15, 2048: 5, 4096: 3}
_DEFAULTS = BCLSConfig().loss_kwargs()  # the Kendall case runs BCLS's default SW-HS knobs
KENDALL = dict(
    window_size=_DEFAULTS["kendall_window_size"],
    label_gap=_DEFAULTS["kendall_label_gap"],
    surrogate=_DEFAULTS["kendall_surrogate"],
    hard_mining=_DEFAULTS["kendall_hard_mining"],
)
TORCH_PATH = " (torch path)"
CASES = [
    "VSE++ triplet", "Triplet-SN", "Kendall SW-HS", "BCLS total", "Label side only",
    "Kendall SW-HS" + TORCH_PATH, "BCLS total" + TORCH_PATH, "All-pairs Kendall",
]


def make_inputs(batch_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch_size, DIM, generator=generator), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(batch_size, DIM, generator=generator), dim=-1).requires_grad_()
    image_ids = torch.randint(0, NUM_IMAGES, (batch_size,), generator=generator)
    positive_mask = image_ids[:, None] == image_ids[None, :]
    relevance = torch.rand(batch_size, batch_size, generator=generator)
    relevance[positive_mask] = 1.0
    return img, txt, positive_mask, relevance


def kendall_both_directions(sim, relevance):
    order_i2t, order_t2i = relevance_sort_order(relevance), relevance_sort_order(relevance.T)
    i2t = kendall_ranking_loss(sim, relevance, sort_order=order_i2t, **KENDALL)
    t2i = kendall_ranking_loss(sim.T, relevance.T, sort_order=order_t2i, **KENDALL)
    return (i2t + t2i) / 2


def all_pairs_both_directions(sim, relevance):
    kwargs = dict(window_size=None, label_gap=0.05, hard_mining=False)
    return (kendall_ranking_loss(sim, relevance, **kwargs) + kendall_ranking_loss(sim.T, relevance.T, **kwargs)) / 2


def bcls_total(sim, mask, relevance):
    order_i2t, order_t2i = relevance_sort_order(relevance), relevance_sort_order(relevance.T)  # label side
    return bcls_loss(sim, mask, relevance, sort_order_i2t=order_i2t, sort_order_t2i=order_t2i)["loss"]


def label_side(relevance):
    """Sort order and window starts of both directions (what depends on the labels only), as BCLS total runs them:
    ``relevance_sort_order`` (a collator's job in training), then the loss's own pass that checks the order and
    computes the window starts."""
    for rel in (relevance, relevance.T):
        loss_kendall._label_windows(rel, relevance_sort_order(rel), KENDALL["label_gap"])


@contextlib.contextmanager
def torch_path(enabled: bool = True):
    """The Kendall loss without its compiled kernels (its GPU path, run on CPU) while inside."""
    original = loss_kendall.get_kernels
    if enabled:
        loss_kendall.get_kernels = lambda: None
    try:
        yield
    finally:
        loss_kendall.get_kernels = original


def make_step(case: str, img, txt, mask, relevance):
    if case.endswith(TORCH_PATH):
        inner = make_step(case[: -len(TORCH_PATH)], img, txt, mask, relevance)

        def on_torch_path():
            with torch_path():
                return inner()

        return on_torch_path
    if case == "Label side only":
        return lambda: label_side(relevance)
    losses = {
        "VSE++ triplet": lambda sim: bcls_loss(sim, mask, objective="vse")["loss"],
        "Triplet-SN": lambda sim: bcls_loss(sim, mask, objective="triplet_sn")["loss"],
        "Kendall SW-HS": lambda sim: kendall_both_directions(sim, relevance),
        "BCLS total": lambda sim: bcls_total(sim, mask, relevance),
        "All-pairs Kendall": lambda sim: all_pairs_both_directions(sim, relevance),
    }
    loss_fn = losses[case]

    def step():
        img.grad = txt.grad = None
        loss = loss_fn(img @ txt.T)
        loss.backward()
        return loss

    return step


def cases_for(batch_size: int):
    return [case for case in CASES if case != "All-pairs Kendall" or batch_size <= ALL_PAIRS_MAX_B]


def time_cases(batch_size: int, repeats: int, clock=time.perf_counter):
    """Median step time per case. The O(B^3) all-pairs case is timed on its own; the others are interleaved with a
    rotating start, so that no case always follows the same one (allocator and cache state carry over)."""
    inputs = make_inputs(batch_size)
    steps = {case: make_step(case, *inputs) for case in cases_for(batch_size)}
    times = {case: [] for case in steps}
    for step in steps.values():
        step()  # warm-up
    interleaved = [case for case in steps if case != "All-pairs Kendall"]
    for round_index in range(repeats):
        shift = round_index % len(interleaved)
        for case in interleaved[shift:] + interleaved[:shift]:
            start = clock()
            steps[case]()
            times[case].append(clock() - start)
    if "All-pairs Kendall" in steps:
        for _ in range(max(1, repeats // 3)):
            start = clock()
            steps["All-pairs Kendall"]()
            times["All-pairs Kendall"].append(clock() - start)
    return {case: statistics.median(values) for case, values in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(batch_size: int, case: str) -> None:
    """Child process: prints the resident-set increase (MiB) over one step of ``case``."""
    step = make_step(case, *make_inputs(batch_size))
    step()  # first calls: lazy initialisations (NumPy, thread pools) are not the step's memory
    step()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    step()
    print((_status_kib("VmHWM") - before) / 1024)


def measure_memory(batch_size: int, case: str, threads: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
    thread_args = ["--threads", str(threads)]
    out = subprocess.run(
        [sys.executable, __file__, *thread_args, "--memory-probe", str(batch_size), case],
        env=env, check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048, 4096])
    parser.add_argument("--repeat-scale", type=float, default=1.0, help="multiplies the number of repeats")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None,
        help="torch thread counts, one table section each (default: 1 and torch's default; 1: per-thread CPU time)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-probe", nargs=2, metavar=("B", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        if args.threads:
            torch.set_num_threads(args.threads[0])
        memory_probe(int(args.memory_probe[0]), args.memory_probe[1])
        return

    default_threads = torch.get_num_threads()
    thread_counts = args.threads or sorted({1, default_threads})
    torch.manual_seed(0)
    print(
        f"# Loss cost, fwd+bwd of `sim = img @ txt.T` + loss (both directions), dim {DIM}, float32, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch default threads {default_threads}, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        "# time: median of interleaved repeats (1 thread: CPU time of the single torch thread; more: wall clock), "
        "× VSE++ at the same thread count; peak mem: resident-set increase over one step, fresh process per case "
        f"(run with {thread_counts[0]} thread(s))"
    )
    print("# Kendall SW-HS and BCLS total include the label-side relevance_sort_order of both directions")
    print(f"# Kendall knobs (BCLSConfig defaults): {KENDALL}")
    kernels = loss_kendall.get_kernels()
    if kernels is None:
        print("# Kendall path: pure torch (+ NumPy sort); Numba kernels unavailable or BCLS_DISABLE_NUMBA set")
    else:
        import numba

        print(f"# Kendall path: compiled CPU kernels (numba {numba.__version__}); '{TORCH_PATH.strip()}': without them")
    print()
    print("| threads | B | loss | time (ms) | × VSE++ | peak mem (MiB) | × VSE++ |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        for batch_size in args.sizes:
            repeats = max(1, round(REPEATS.get(batch_size, 3) * args.repeat_scale))
            times = time_cases(batch_size, repeats, clock)
            memory = {}
            if not args.no_memory and threads == thread_counts[0]:
                memory = {case: measure_memory(batch_size, case, threads) for case in times}
            for case, seconds in times.items():
                ratio = seconds / times["VSE++ triplet"]
                mem = "– | –"
                if memory:
                    base = memory["VSE++ triplet"]
                    mem = f"{memory[case]:.2f} | " + (f"{memory[case] / base:.2f}" if base >= 0.25 else "n/a (< 0.25 MiB)")
                print(f"| {threads} | {batch_size} | {case} | {seconds * 1e3:.1f} | {ratio:.2f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
