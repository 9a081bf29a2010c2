"""Data-parallel training across devices and hosts, on JAX's own machinery (issue 16 part 3).

One programming model for every case: a 1-D `jax.sharding.Mesh` whose single axis (`BATCH_AXIS`) spans the
devices used, batches sharded along it (`NamedSharding(mesh, P("batch"))`), everything else (parameters,
optimiser state, keys) replicated (`P()`), and one `jax.jit` of the UNCHANGED global-batch step. XLA's SPMD
partitioner splits the step and inserts the all-reduces (gradients, losses, batch-norm statistics). So the
computation is the global one whatever the number of devices: the same global batch, the same random streams
(JAX's threefry is partitionable: a key gives the same numbers however the array is split), the same result
to float rounding (reductions are summed in a different order). No parameter server, no pmap.

Several processes (several hosts, or one process per GPU) join through `jax.distributed.initialize`
(`initialize_distributed`), configured from the environment:

- `JAX_COORDINATOR_ADDRESS` (JAX's own name): `host:port` of process 0, which runs the coordinator;
- `DEEPSPM_NUM_PROCESSES` and `DEEPSPM_PROCESS_ID` (ours: JAX reads no variable for these two): how many
  processes, and this one's index 0..n-1;
- under Slurm (`srun`, more than one task) or Open MPI (`mpirun`, more than one rank) none of these is needed:
  JAX detects the coordinator, the count and the index from the launcher's own variables;
- `JAX_LOCAL_DEVICE_IDS` (JAX's own, optional): the local devices this process may use.

Every process runs the same program on the same data (same seed, same files): each one builds the same global
batch and hands JAX only the rows its own devices hold, so neither the data order nor the result depends on
the number of processes or devices. Training steps are collective: all processes must call them in the same
order, which they do because they run the same seeded loop.

The parallel path needs the global batch to split evenly over the devices: "all" takes the most devices that
split it (64 over 3 GPUs: 2), an explicit count that does not is an error. `mesh_for(1)` in one process is
None, and callers then keep their single-device path unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DEEPSPM_NUM_PROCESSES"
ENV_PROCESS_ID = "DEEPSPM_PROCESS_ID"
# Launchers whose variables JAX's own cluster detection reads (a count above 1 means a multi-process job).
_LAUNCHER_COUNTS = {"SLURM_NTASKS": "slurm", "OMPI_COMM_WORLD_SIZE": "ompi"}

Devices = int | str | None
"""How many devices per process: a positive int, "all" (every local device), or None (the caller's default)."""


class ParallelError(ValueError):
    """Data-parallel training cannot run as asked (a bad device count, a batch that does not split over the
    devices, an incomplete multi-process environment); the message names the problem in one line."""


def parse_devices(text: str) -> int | str:
    """`--devices` text: "all" or a positive integer."""
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise ParallelError(f"devices must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise ParallelError(f"devices must be a positive integer or 'all', got {text!r}")
    return value


# --- several processes ------------------------------------------------------------------------------------


def distributed_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """What `initialize_distributed` would pass to `jax.distributed.initialize`, read from `environ`
    (default `os.environ`): None for a single process; `{}` for a launcher JAX detects by itself (Slurm, Open
    MPI); else the coordinator address, process count and process id. `ParallelError` when only some are set."""
    env = os.environ if environ is None else environ
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    given = {name: env.get(name, "").strip() for name in names}
    if any(given.values()):
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise ParallelError(f"multi-process training needs {', '.join(names)}; missing {', '.join(missing)}")
        try:
            count, index = int(given[ENV_NUM_PROCESSES]), int(given[ENV_PROCESS_ID])
        except ValueError:
            raise ParallelError(
                f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers, got "
                f"{given[ENV_NUM_PROCESSES]!r} and {given[ENV_PROCESS_ID]!r}") from None
        if count < 1 or not 0 <= index < count:
            raise ParallelError(f"{ENV_PROCESS_ID} must be in 0..{ENV_NUM_PROCESSES}-1, got {index} of {count}")
        if ":" not in given[ENV_COORDINATOR]:
            raise ParallelError(f"{ENV_COORDINATOR} must be host:port, got {given[ENV_COORDINATOR]!r}")
        if count == 1:
            return None
        return {"coordinator_address": given[ENV_COORDINATOR], "num_processes": count, "process_id": index}
    for name, method in _LAUNCHER_COUNTS.items():
        try:
            if int(env.get(name, "1")) > 1:
                return {"cluster_detection_method": method}
        except ValueError:
            continue
    return None


def initialize_distributed(environ: Mapping[str, str] | None = None, timeout_s: int = 300) -> bool:
    """Join the multi-process job the environment describes (see the module docstring); a no-op for a single
    process or when already joined. Must run before any other JAX call of the process. Returns whether this
    process is one of several."""
    settings = distributed_settings(environ)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(**settings, initialization_timeout=timeout_s)
    return True


def is_main_process() -> bool:
    """Process 0 (the one that writes results) or the only process."""
    return jax.process_index() == 0


# --- the mesh ---------------------------------------------------------------------------------------------


def mesh_for(devices: Devices = "all", batch_size: int | None = None) -> Mesh | None:
    """A 1-D mesh over `devices` local devices of every process, or None when that is one device in one process
    (the caller's single-device path). "all" (or None): every local device, or with `batch_size` the most
    (the same number in every process) over which a global batch of that size splits evenly."""
    by_process: dict[int, list[jax.Device]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    local = len(jax.local_devices())
    if devices is None or devices == "all":
        per_process = local
        if batch_size is not None:
            while per_process > 1 and batch_size % (per_process * len(by_process)):
                per_process -= 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        if devices > local:
            raise ParallelError(f"{devices} devices asked for but this process has {local} "
                                f"({jax.default_backend()})")
        per_process = devices
    else:
        raise ParallelError(f"devices must be a positive integer or 'all', got {devices!r}")
    if per_process == 1 and len(by_process) == 1:
        return None
    chosen = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:per_process]]
    return Mesh(np.array(chosen), (BATCH_AXIS,))


def device_count(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def check_batch(n_devices: int, batch_size: int) -> None:
    """`ParallelError` unless a global batch of `batch_size` splits evenly over `n_devices` devices."""
    if batch_size % n_devices:
        raise ParallelError(f"the batch of {batch_size} does not split evenly over {n_devices} devices "
                            "(use a device count that divides it)")


class _Scope:
    """A `use_devices` block: the devices asked for, and how many training loops took them."""

    def __init__(self, devices: Devices) -> None:
        self.devices = devices
        self.taken = 0


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("deepspm_devices", default=None)


@contextlib.contextmanager
def use_devices(devices: Devices) -> Iterator[_Scope]:
    """Within this block, training code called with `devices=None` uses `devices` (how the command line's
    `--devices` reaches training loops it does not call directly). The value bound by `as` counts, in `taken`,
    the training loops that asked for the block's devices (none: nothing in the block can run data-parallel)."""
    scope = _Scope(devices)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def scoped_devices(devices: Devices = None) -> Devices:
    """`devices` if given, else the enclosing `use_devices` block's choice (counted as taken), else 1 (today's
    single-device path)."""
    if devices is not None:
        return devices
    scope = _SCOPE.get()
    if scope is None:
        return 1
    scope.taken += 1
    return scope.devices


@contextlib.contextmanager
def training_command(devices: Devices, out: Path) -> Iterator[tuple[_Scope, Path]]:
    """What `deepspm train ... --devices` runs its command in: joins the multi-process job the environment
    describes (first, before anything else starts JAX), then runs the block under `use_devices(devices)`.
    Yields the scope and where this process writes its results: `out` in process 0 (or the only process); in
    the others, which compute the same result, a scratch folder deleted afterwards (one writer per job)."""
    initialize_distributed()
    with use_devices(devices) as scope:
        if is_main_process():
            yield scope, Path(out)
        else:
            with tempfile.TemporaryDirectory(prefix=f"deepspm-process{jax.process_index()}-") as scratch:
                yield scope, Path(scratch) / Path(out).name


# --- placing data -----------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_place(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(x)  # every process holds the same global value; each hands over its devices' part
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every leaf of `tree` (numpy, jax or PRNG-key arrays) as a global array replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def shard_batch(mesh: Mesh, tree: Any) -> Any:
    """Every leaf of `tree` (the same global batch in every process) split along its first axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def to_local(tree: Any) -> Any:
    """Replicated global arrays -> ordinary arrays on this process's default device (for evaluation, saving and
    everything that does not run across the mesh)."""
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x)), jax.device_get(tree))


# --- running a step ---------------------------------------------------------------------------------------


def data_parallel(
    fn: Callable[..., Any], mesh: Mesh, batch_argnums: Sequence[int], donate_argnums: Sequence[int] = (),
) -> Callable[..., Any]:
    """`fn` (a pure step written for one global batch; jitted or not) run across `mesh`: the positional
    arguments in `batch_argnums` are split along their first axis, every other argument is replicated, and
    every output comes back replicated. The global batch size must split evenly over the devices.

    The arguments may be host (numpy) arrays holding the whole global value in every process, or arrays
    already placed by `replicate` / `shard_batch` (then nothing moves)."""
    batch_args = frozenset(batch_argnums)
    jitted = jax.jit(fn, out_shardings=replicated(mesh), donate_argnums=tuple(donate_argnums))

    def run(*args: Any) -> Any:
        placed = []
        for i, arg in enumerate(args):
            if i in batch_args:
                for leaf in jax.tree.leaves(arg):
                    check_batch(device_count(mesh), int(np.shape(leaf)[0]))
                placed.append(shard_batch(mesh, arg))
            else:
                placed.append(replicate(mesh, arg))
        return jitted(*placed)

    return run


def over_devices(
    fn: Callable[..., Any], batch_argnums: Sequence[int], devices: Devices = None, donate_argnums: Sequence[int] = (),
    batch_size: int | None = None,
) -> Callable[..., Any]:
    """`fn` unchanged where `devices` (None: `scoped_devices()`) is one device in one process, else
    `data_parallel(fn, ...)` over `mesh_for(devices, batch_size)`: the one line a training loop needs to honour
    `--devices`, e.g. the DQN learner's `over_devices(make_update_step(...), range(1, 7), batch_size=64)`."""
    mesh = mesh_for(scoped_devices(devices), batch_size)
    return fn if mesh is None else data_parallel(fn, mesh, batch_argnums, donate_argnums)
