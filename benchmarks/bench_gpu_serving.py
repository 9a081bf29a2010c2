"""Which JAX inference form to serve on this backend: the serving form, a plain `jax.jit`, or PyTorch eager.

Issue 16 part 4: the serving form (`deepspm.nets.serving` behind `Predictor`: BN folded, Winograd convs, the
dense kernels laid out per batch size) was tuned on a CPU. This measures, per preset and batch size, on
whatever backend JAX finds (a GPU where there is one), the latency of
- `serving`: `Predictor(net, variables, "values")`, AOT-compiled for the batch size, as the run calls it;
- `direct`: the same `Predictor` traced with every conv direct (`serving.winograd_plan` patched to all
  False while it compiles): BN folded and the per-batch dense layouts kept, Winograd left out, to tell
  which of the two CPU tunings a backend objects to (for `compact`, which has no Winograd conv, it is
  the serving form again: the pair shows the noise);
- `plain`: `jax.jit` of `model.apply_eval` (the NNX module in eval mode, the reference arithmetic);
- `eager`: PyTorch eager of the same layer plan holding the same weights (`bench_nets.torch_net`), on the
  GPU when PyTorch sees one (else on the CPU), under `torch.inference_mode()`.
Every call takes a numpy batch (B, 64, 64, 1) float32 and returns numpy outputs, as the run does: the copy
to the device and back is part of each call, and reading the outputs back waits for the device (the same
thing `block_until_ready` / `torch.cuda.synchronize` do). The figure is the median of `reps` timed calls
per form, after `warmup` untimed ones, measured in rounds that alternate the forms (one call of each per
round), so that clock or load drift hits every form alike. First-call times (tracing and compiling for the
JAX forms, cuDNN set-up for eager) are reported beside them. Every form's outputs are compared with the
plain form's on the same input (max |difference|); the default float32 precision of each framework is
used (on a GPU both may run float32 matrix work as TF32: the flags are written to the JSON).

    python3 -m benchmarks.bench_gpu_serving --out DIR            # defaults per backend, see --help
    python3 -m benchmarks.bench_gpu_serving --quick --out DIR    # tiny + compact, batch 1 and 8: seconds

Each (preset, batch) row gives serving/plain, direct/plain and plain/eager and the fastest form; the JSON
(DIR/gpu_serving.json) is rewritten after every row, so a run cut short keeps what it measured.
A form that fails (an API difference between library versions, out of memory) is reported as n/a with its
error; the other forms are still measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import jax
import numpy as np

from benchmarks import bench_nets
from benchmarks.common import RESULTS, print_table, write_json
from deepspm.nets import serving
from deepspm.nets.inference import Predictor
from deepspm.nets.model import NetDef, apply_eval
from deepspm.nets.presets import PRESETS

FORMS = ("serving", "direct", "plain", "eager")
JAX_FORMS = FORMS[:3]
N_OUTPUTS = 12  # the agent's head (Q-values of 12 actions); the classifier's 1 logit changes nothing measurable
JSON_NAME = "gpu_serving"


class Plan(NamedTuple):
    presets: tuple[str, ...]
    batches: tuple[int, ...]
    warmup: int  # untimed calls of each form
    reps: int  # timed calls of each form


QUICK = Plan(("tiny", "compact"), (1, 8), warmup=1, reps=3)
ACCELERATOR = Plan(("compact", "original", "paper"), (1, 64, 256), warmup=10, reps=50)
# On a CPU (`make bench`) `paper` takes seconds per call at batch 8 and `original` ~10 s at batch 256: left
# out unless asked for.
CPU = Plan(("compact", "original"), (1, 8, 64), warmup=1, reps=5)


@dataclass
class Row:
    preset: str
    batch: int
    median_s: dict[str, float | None] = field(default_factory=dict)  # per form; None: not measured
    best_s: dict[str, float | None] = field(default_factory=dict)
    first_call_s: dict[str, float | None] = field(default_factory=dict)  # compile (JAX) or set-up (eager) + 1 call
    max_abs_diff: dict[str, float | None] = field(default_factory=dict)  # against the plain form's outputs
    output_scale: float | None = None  # max |plain outputs|
    errors: dict[str, str] = field(default_factory=dict)  # per form, why it is n/a
    samples_s: dict[str, list[float]] = field(default_factory=dict)
    skipped: str = ""  # why the whole row was not measured

    def ratio(self, a: str, b: str) -> float | None:
        x, y = self.median_s.get(a), self.median_s.get(b)
        return None if x is None or y is None else x / y

    @property
    def fastest(self) -> str | None:
        timed = {k: v for k, v in self.median_s.items() if v is not None}
        return min(timed, key=timed.__getitem__) if timed else None

    @property
    def jax_pick(self) -> str | None:
        """The fastest of the JAX forms (what issue 16 asks to choose per backend)."""
        timed = {k: t for k in JAX_FORMS if (t := self.median_s.get(k)) is not None}
        return min(timed, key=timed.__getitem__) if timed else None


# --- the command line ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batches(text: str) -> tuple[int, ...]:
    values = tuple(_positive_int(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated batch sizes, e.g. 1,64,256")
    return values


def _presets(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown preset {', '.join(unknown) or repr(text)}; known: {', '.join(PRESETS)}")
    return names


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 s, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m benchmarks.bench_gpu_serving",
        description="Inference latency of the serving form, the serving form with direct convs, a plain jax.jit "
                    "of apply_eval and PyTorch eager (same weights), per preset and batch size, numpy in and out, "
                    "on JAX's default backend.",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {JSON_NAME}.json (default: {RESULTS})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: presets tiny,compact, batches 1,8, 1 warm-up call, 3 timed calls (seconds on a CPU)")
    p.add_argument("--presets", type=_presets, default=None,
                   help="comma-separated presets, smallest first (default on an accelerator: compact,original,paper; "
                        "on a CPU: compact,original)")
    p.add_argument("--batches", type=_batches, default=None,
                   help="comma-separated batch sizes in images (default 1,64,256; on a CPU 1,8,64)")
    p.add_argument("--warmup", type=_positive_int, default=None,
                   help="untimed calls of each form before timing (default 10 on an accelerator, 1 on a CPU)")
    p.add_argument("--reps", type=_positive_int, default=None,
                   help="timed calls of each form per row; the median is reported (default 50 on an accelerator, 5 on a CPU)")
    p.add_argument("--deadline", type=_seconds, default=math.inf,
                   help="seconds after start past which no further row is begun (its row reads 'skipped'); default none")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images (default 0)")
    p.add_argument("--without-torch", action="store_true",
                   help="do not import PyTorch's net (eager reads n/a): where torch and JAX cannot share a process")
    return p


# --- measuring ----------------------------------------------------------------------------------------------


def backend_info(torch_device: str) -> dict[str, Any]:
    device = jax.devices()[0]
    info: dict[str, Any] = {
        "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_device": getattr(device, "device_kind", str(device)),
        "jax_default_matmul_precision": getattr(jax.config, "jax_default_matmul_precision", None),
        "torch": None, "torch_device": torch_device,
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except Exception:  # noqa: BLE001 - informative only
        pass
    torch = bench_nets.torch
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        info["torch_cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        info["torch_cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        if torch_device == "cuda":
            info["torch_cuda_device"] = torch.cuda.get_device_name()
        else:
            info["torch_threads"] = torch.get_num_threads()
    return info


def pick_torch_device() -> str:
    torch = bench_nets.torch
    if torch is not None and jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _first_call(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _compile_direct(predictor: Predictor, batch: int) -> None:
    """Compile `predictor` for `batch` with no Winograd conv (prepare and forward both read the plan while
    tracing, which happens here, once; later calls run the compiled executables)."""
    direct_plan = lambda spec: (False,) * len(spec.conv_shapes())  # noqa: E731
    with mock.patch.object(serving, "winograd_plan", direct_plan):
        predictor.compile([batch])


def measure_preset(name: str, batches: Sequence[int], *, warmup: int, reps: int, seed: int, torch_device: str,
                   deadline: float, started: float, on_row: Callable[[Row], None]) -> list[Row]:
    """Every batch size of one preset: one net per form built once from the same random weights."""
    rows: list[Row] = []
    net = NetDef.of(name, N_OUTPUTS)
    variables = bench_nets.random_vars(net, seed)
    # form -> batch -> (call(images) -> numpy outputs, compile-ahead step or None)
    builders: dict[str, Callable[[int], tuple[Callable[[np.ndarray], np.ndarray], Callable[[], Any] | None]]] = {}
    setup_errors: dict[str, str] = {}

    try:
        predictor = Predictor(net, variables, "values")
        builders["serving"] = lambda batch: (lambda images: predictor(images), lambda: predictor.compile([batch]))
    except Exception as exc:  # noqa: BLE001 - reported, the other forms still run
        setup_errors["serving"] = _error(exc)
    try:
        direct = Predictor(net, variables, "values")
        builders["direct"] = lambda batch: (lambda images: direct(images), lambda: _compile_direct(direct, batch))
    except Exception as exc:  # noqa: BLE001
        setup_errors["direct"] = _error(exc)
    try:
        plain = jax.jit(partial(apply_eval, net))
        builders["plain"] = lambda batch: (lambda images: np.asarray(plain(variables, images)), None)
    except Exception as exc:  # noqa: BLE001
        setup_errors["plain"] = _error(exc)
    if bench_nets.torch is None:
        setup_errors["eager"] = "torch not installed"
    else:
        try:
            module = bench_nets.torch_net(net, variables).to(torch_device)
            forward = bench_nets.torch_forward(module, torch_device)
            builders["eager"] = lambda batch: (forward, None)
        except Exception as exc:  # noqa: BLE001
            setup_errors["eager"] = _error(exc)

    rng = np.random.default_rng(seed)
    for batch in batches:
        row = Row(name, batch)
        if time.perf_counter() - started > deadline:
            row.skipped = "deadline"
            rows.append(row)
            on_row(row)
            continue
        images = rng.uniform(-1.5, 1.5, (batch, 64, 64, 1)).astype(np.float32)
        calls: dict[str, Callable[[], np.ndarray]] = {}
        outputs: dict[str, np.ndarray] = {}
        for form in FORMS:
            row.median_s[form] = row.best_s[form] = row.first_call_s[form] = row.max_abs_diff[form] = None
            if form in setup_errors:
                row.errors[form] = setup_errors[form]
                continue
            try:
                call, compile_ahead = builders[form](batch)
                start = time.perf_counter()
                if compile_ahead is not None:
                    compile_ahead()
                outputs[form] = np.asarray(call(images))
                row.first_call_s[form] = time.perf_counter() - start
                calls[form] = partial(call, images)
            except Exception as exc:  # noqa: BLE001
                row.errors[form] = _error(exc)
        if "plain" in outputs:
            reference = outputs["plain"]
            row.output_scale = float(np.max(np.abs(reference)))
            for form, out in outputs.items():
                row.max_abs_diff[form] = float(np.max(np.abs(out - reference))) if out.shape == reference.shape else math.inf
        try:
            for _ in range(warmup):
                for timed_call in calls.values():
                    timed_call()
            samples = bench_nets.interleaved_timings(calls, reps, min_block_s=0.0)
        except Exception as exc:  # noqa: BLE001 - e.g. out of device memory mid-timing
            for form in calls:
                row.errors[form] = _error(exc)
            samples = {}
        for form, times in samples.items():
            row.samples_s[form] = times
            row.median_s[form] = statistics.median(times)
            row.best_s[form] = min(times)
        rows.append(row)
        on_row(row)
    return rows


def _free_device_memory() -> None:
    gc.collect()
    torch = bench_nets.torch
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the report ---------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3g}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _diff(row: Row) -> str:
    parts = [f"{form[0]} {row.max_abs_diff[form]:.1e}" for form in ("serving", "direct", "eager")
             if row.max_abs_diff.get(form) is not None]
    return ", ".join(parts) or "n/a"


def table_rows(rows: Sequence[Row]) -> list[tuple[Any, ...]]:
    out = []
    for r in rows:
        if r.skipped:
            out.append((r.preset, r.batch, *(["skipped"] * 4), "", "", "", r.skipped, "", "", ""))
            continue
        out.append((r.preset, r.batch, *(_ms(r.median_s[f]) for f in FORMS), _x(r.ratio("serving", "plain")),
                    _x(r.ratio("direct", "plain")), _x(r.ratio("plain", "eager")), r.fastest or "n/a",
                    r.jax_pick or "n/a", _diff(r),
                    " / ".join("n/a" if r.first_call_s[f] is None else f"{r.first_call_s[f]:.1f}" for f in FORMS)))
    return out


HEADER = ("preset", "batch", "serving ms", "direct ms", "plain ms", "eager ms", "serving/plain", "direct/plain",
          "plain/eager", "fastest", "JAX pick", "max|diff| vs plain", "first call s (s/d/p/e)")


def picks_by_batch(rows: Sequence[Row]) -> dict[int, dict[str, list[str]]]:
    """For each batch size, the presets where each JAX form won (the rule a backend's choice can follow)."""
    picks: dict[int, dict[str, list[str]]] = {}
    for r in rows:
        if r.jax_pick is not None:
            picks.setdefault(r.batch, {form: [] for form in JAX_FORMS})[r.jax_pick].append(r.preset)
    return picks


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Parse `argv`, measure, print the tables, write DIR/gpu_serving.json; returns the JSON payload.

    `make bench` calls `main()` with no arguments: the defaults for the backend found."""
    args = parser().parse_args(list(argv))
    if args.without_torch:
        bench_nets.torch = None
    accelerated = jax.default_backend() != "cpu"
    defaults = QUICK if args.quick else ACCELERATOR if accelerated else CPU
    presets = args.presets or defaults.presets
    batches = args.batches or defaults.batches
    warmup = args.warmup or defaults.warmup
    reps = args.reps or defaults.reps
    torch_device = pick_torch_device()
    info = backend_info(torch_device)
    print_table("Backend", ("what", "value"), list(info.items()))
    started = time.perf_counter()
    rows: list[Row] = []
    payload: dict[str, Any] = {"backend": info, "presets": list(presets), "batches": list(batches), "warmup": warmup,
                               "reps": reps, "forms": list(FORMS), "rows": [], "preset_errors": {}}

    def save() -> Path:
        payload["rows"] = [asdict(r) | {"fastest": r.fastest, "jax_pick": r.jax_pick,
                                        "serving_over_plain": r.ratio("serving", "plain"),
                                        "direct_over_plain": r.ratio("direct", "plain"),
                                        "plain_over_eager": r.ratio("plain", "eager")} for r in rows]
        payload["picks_by_batch"] = {str(b): p for b, p in picks_by_batch(rows).items()}
        payload["elapsed_s"] = time.perf_counter() - started
        return write_json(JSON_NAME, payload, args.out)

    def on_row(row: Row) -> None:
        rows.append(row)
        print(f"[{time.perf_counter() - started:.0f} s] " + "  ".join(map(str, table_rows([row])[0])))
        for form, error in row.errors.items():
            print(f"  {row.preset} batch {row.batch}: {form} n/a ({error})")
        sys.stdout.flush()
        save()

    for name in presets:
        if time.perf_counter() - started > args.deadline:
            for batch in batches:
                on_row(Row(name, batch, skipped="deadline"))
            continue
        try:
            measure_preset(name, batches, warmup=warmup, reps=reps, seed=args.seed, torch_device=torch_device,
                           deadline=args.deadline, started=started, on_row=on_row)
        except Exception as exc:  # noqa: BLE001 - e.g. the net cannot be built with this flax: report, go on
            payload["preset_errors"][name] = _error(exc)
            print(f"{name}: failed: {_error(exc)}")
            traceback.print_exc(limit=4)
        _free_device_memory()

    title = (f"Inference latency, ms: median of {reps} calls after {warmup} warm-up calls, numpy in and out "
             f"(JAX {info['jax']} on {info['jax_device']}; PyTorch {info['torch']} eager on {torch_device})")
    print_table(title, HEADER, table_rows(rows))
    picks = picks_by_batch(rows)
    print_table("Fastest JAX form by batch size (presets where it won)", ("batch", *JAX_FORMS),
                [(b, *(",".join(p[f]) or "-" for f in JAX_FORMS)) for b, p in sorted(picks.items())])
    for name, error in payload["preset_errors"].items():
        print(f"{name}: not measured ({error})")
    print("wrote", save())
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
