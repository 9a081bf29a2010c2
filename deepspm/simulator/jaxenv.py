"""A vectorised probe-conditioning environment in JAX: many simulated microscopes in one jitted function.

The same physics as the numpy simulator, read from its own tables (nothing here restates a number of the model):
- probe kinds and their parameters: a bank of probes drawn by `probe.make_probe` (numpy, seeded), `BANK_SIZE`
  per kind, turned into fixed-shape arrays; a fresh probe of a kind is a uniformly drawn row of that kind;
- conditioning: `conditioning.fix_probability` / `damage_probability` / the damage-kind weights evaluated for
  every row of the action table at a gap (`REFERENCE_GAP_M` by default), the severity scaling read off
  `fix_probability`, the jitter scale off `probe.jitter_probe`;
- spontaneous tip changes while scanning: `conditioning.SPONTANEOUS_CHANGE`, `DEGRADE_KIND_WEIGHTS` and
  `SimConfig.degradation_per_frame`, per scanned line (`lines / 64` frames per step, creep frame included);
- the sample: MgPc molecules (`sample.molecule_components`' lobe and centre constants, two rotational domains,
  Matern-II hard core, the per-area log-normal density), adatoms and monatomic Ag(100) steps from `SampleConfig`;
- the image: the Gaussian components blurred by each apex (variances add), apices combined by the tunnelling
  sum with `probe.BETA_PER_M`, flicker between two kernels in bands of lines, streaks, white noise and a
  per-line random walk, all with the probe's own amplitudes (`render.py`'s model).

How a frame is rendered fast (`layouts`, `render_one`): once per parameter set, `LAYOUTS` clean substrates (the
components above, drawn at densities stratified over the per-area log-normal) are rendered on a canvas of
`PAD_PX` around the frame at `WIDTH_BINS` apex widths. A frame takes a random layout of its area's density
stratum; the main apex (never displaced) reads the frame's centre, its width interpolated between two bins; each
other apex reads the crop of the bank's exp(beta h) at its offset rounded to whole pixels (clipped to `PAD_PX`), its
width bin rounded stochastically (the banks a frame reads are float16); noise is a random block of a bank of
white-noise rows with a random sign; all of a frame's other random numbers come from one threefry call.

What is simplified (training needs the frames' statistics, not the instrument; `tests/test_jaxenv.py` holds
the two simulators' statistics together):
- the frame is rendered already levelled: no piezo drift, tilt or creep; the plane is a least-squares fit on the
  clean substrate pixels of the larger terrace (the numpy run fits RANSAC to all pixels), then `h / 1 A - 1`
  clipped to +-1.5 as `controller.preprocess.normalise` does;
- a spontaneous tip change happens between frames (numpy: at a random pixel within the scan);
- at most one streak per line (numpy: a Poisson number; the rates are <= 0.3 per line);
- a frame's molecules are one of `LAYOUTS` layouts (numpy: a fresh surface per area), displaced apices sit on
  whole pixels (0.16 nm), the step edge is blurred by the main apex alone (numpy: seen through every apex);
- no rough patches (the run discards bad-sample frames without classifying them), no debris (the run never
  scans where it acted), no crashes or lost contact (the training environment has no z jumps).

State is a `ProbeBatch` of arrays with a leading batch axis; every function is pure and takes its key.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepspm.io.actions import ACTIONS, N_ACTIONS, RESET_ACTIONS
from deepspm.simulator.conditioning import (
    DEGRADE_KIND_WEIGHTS,
    REFERENCE_GAP_M,
    SPONTANEOUS_CHANGE,
    _damage_kind_weights,
    damage_probability,
    event_for_action,
    fix_probability,
)
from deepspm.simulator.environment import ENV_CONFIG
from deepspm.simulator.probe import ANGSTROM, BETA_PER_M, NM, ProbeKind, jitter_probe, make_probe
from deepspm.simulator.render import STEP_EDGE_WIDTH_M
from deepspm.simulator.sample import (
    AG100_STEP_M,
    CENTRE_AMP_M,
    CENTRE_SIGMA_M,
    LOBE_AMP_M,
    LOBE_RADIUS_M,
    LOBE_SIGMA_M,
    MOLECULE_HARD_CORE_M,
    SampleConfig,
    area_rng,
)

KINDS: tuple[ProbeKind, ...] = tuple(ProbeKind)  # index 0 = good
GOOD = KINDS.index(ProbeKind.GOOD)
APEX_SLOTS = 4  # a multiple tip has up to 4 apices; an unstable tip uses slot 1 for its flicker apex
BANK_SIZE = 512
CANDIDATE_SLOTS = 32  # molecule candidates before the hard-core thinning
MOLECULE_SLOTS = 16  # molecules kept per frame (mean ~9 in the 13 nm window at the mean density)
ADATOM_SLOTS = 2
ADATOM_SIGMA_NM = 0.25  # sample.py's adatoms: 0.25 nm wide, 0.6-1.0 Angstrom high
ADATOM_AMP_A = (0.6, 1.0)
LAYOUTS = 128  # pre-rendered clean substrates (`layouts`)
DENSITY_STRATA = 8  # the layouts are stratified over the per-area density; a frame draws from its area's stratum
WIDTH_BINS = 10  # apex widths each layout is rendered at (geometric; linear between two for the main apex)
WIDTH_RANGE_NM = (0.1, 1.6)  # jitter_probe's floor to a blunt apex after many jitters
PAD_PX = 16  # canvas around the frame: an apex displaced by up to 16 px (2.5 nm) reads a shifted crop
NOISE_ROWS = 8192  # rows of white noise a frame's noise is drawn from
RENDER_CHUNK = 64  # frames rendered together (`render`)
_LAYOUT_PURPOSE = 911
EMPTY_TOLERANCE = 0.1  # controller.preprocess.EMPTY_TOLERANCE (a test pins it)
CLIP_LIMIT = 1.5  # controller.preprocess.CLIP_LIMIT (a test pins it)
_BANK_PURPOSE = 907
_BETA_PER_A = BETA_PER_M * ANGSTROM


@dataclass(frozen=True)
class EnvParams:
    """The frame and the scanning around one action (the run's defaults: 10 nm, 64 px, a 30-line creep frame)."""

    pixels: int = 64
    frame_nm: float = 10.0
    lines_per_step: int = 94  # lines scanned per action: the creep frame (30) and the frame (64)
    gap_m: float = REFERENCE_GAP_M
    degradation_per_frame: float = ENV_CONFIG.degradation_per_frame
    margin_nm: float = 1.5  # molecules this far outside the frame still reach into it


class ProbeBatch(NamedTuple):
    """A batch of probes (leading axis = environments). Lengths in nm, heights in Angstrom."""

    kind: jax.Array  # int32, index into KINDS
    severity: jax.Array
    apex: jax.Array  # (..., APEX_SLOTS, 4): dx, dy, width, weight (0 = empty slot)
    kernel: jax.Array  # (..., APEX_SLOTS) int32: 0 = the main kernel, 1 = the flicker kernel
    noise_a: jax.Array
    line_noise_a: jax.Array
    streak_rate: jax.Array
    flicker_rate: jax.Array
    density: jax.Array  # molecule density of the current approach area (per nm^2)


# --- the shared tables -----------------------------------------------------------------------------------------


class Tables(NamedTuple):
    fix: jax.Array  # (kinds, actions) at severity 0
    damage: jax.Array  # (actions,)
    damage_kind: jax.Array  # (actions, kinds) weights of the kind a damaging action leaves
    stall: jax.Array  # (actions,) bool: no physical event
    severity_slope: float  # fix probability x (1 - slope * severity)
    spontaneous: jax.Array  # (kinds,) change probability per frame (good: the degradation rate)
    to_good: jax.Array  # (kinds,)
    degrade_kind: jax.Array  # (kinds, kinds): weights of the new kind after a spontaneous change from a kind
    jitter_scale: float
    reset_actions: jax.Array  # (actions,) bool
    required_px: tuple[int, ...]  # per action: side of the clean square (px) it needs
    bank: ProbeBatch  # (kinds, BANK_SIZE, ...)


def _severity_slope() -> float:
    event = event_for_action(ACTIONS[RESET_ACTIONS[-1]], REFERENCE_GAP_M)
    assert event is not None
    base = fix_probability(ProbeKind.BLUNT, event, 0.0)
    return 1.0 - fix_probability(ProbeKind.BLUNT, event, 1.0) / base


def _bank(seed: int = 0) -> ProbeBatch:
    rng = area_rng(seed, _BANK_PURPOSE)
    k, n = len(KINDS), BANK_SIZE
    apex = np.zeros((k, n, APEX_SLOTS, 4), np.float32)
    kernel = np.zeros((k, n, APEX_SLOTS), np.int32)
    cols = {name: np.zeros((k, n), np.float32) for name in ("severity", "noise", "line", "streak", "flicker")}
    for i, kind in enumerate(KINDS):
        for j in range(n):
            p = make_probe(kind, rng)
            slots = [(a, 0) for a in p.apices] + [(a, 1) for a in p.flicker_apices]
            if len(slots) > APEX_SLOTS:
                raise ValueError(f"a {kind.value} probe with {len(slots)} apices does not fit {APEX_SLOTS} slots")
            for s, (a, kern) in enumerate(slots):
                apex[i, j, s] = (a.dx_m / NM, a.dy_m / NM, a.width_m / NM, a.weight)
                kernel[i, j, s] = kern
            cols["severity"][i, j] = p.severity
            cols["noise"][i, j] = p.noise_m / ANGSTROM
            cols["line"][i, j] = p.line_noise_m / ANGSTROM
            cols["streak"][i, j] = p.streak_rate
            cols["flicker"][i, j] = p.flicker_rate
    kinds = np.broadcast_to(np.arange(k, dtype=np.int32)[:, None], (k, n))
    return ProbeBatch(jnp.asarray(kinds), jnp.asarray(cols["severity"]), jnp.asarray(apex), jnp.asarray(kernel),
                      jnp.asarray(cols["noise"]), jnp.asarray(cols["line"]), jnp.asarray(cols["streak"]),
                      jnp.asarray(cols["flicker"]), jnp.zeros((k, n), jnp.float32))


def tables(params: EnvParams | None = None) -> Tables:
    """The numpy simulator's model as arrays (cached per parameter set; concrete even when called under jit)."""
    with jax.ensure_compile_time_eval():
        return _tables(params or EnvParams())


@lru_cache(maxsize=8)
def _tables(params: EnvParams) -> Tables:
    k = len(KINDS)
    fix = np.zeros((k, N_ACTIONS), np.float32)
    damage = np.zeros(N_ACTIONS, np.float32)
    damage_kind = np.zeros((N_ACTIONS, k), np.float32)
    stall = np.zeros(N_ACTIONS, bool)
    for a in ACTIONS:
        event = event_for_action(a, params.gap_m)
        if event is None:
            stall[a.index] = True
            continue
        for i, kind in enumerate(KINDS):
            fix[i, a.index] = fix_probability(kind, event)
        damage[a.index] = damage_probability(event)
        for kind, w in _damage_kind_weights(event).items():
            damage_kind[a.index, KINDS.index(kind)] = w
    spontaneous = np.zeros(k, np.float32)
    to_good = np.zeros(k, np.float32)
    degrade = np.zeros((k, k), np.float32)
    for i, kind in enumerate(KINDS):
        p, g = (params.degradation_per_frame, 0.0) if kind is ProbeKind.GOOD else SPONTANEOUS_CHANGE[kind]
        spontaneous[i], to_good[i] = p, g
        for new, w in DEGRADE_KIND_WEIGHTS.items():
            if new is not kind:
                degrade[i, KINDS.index(new)] = w
    px_m = params.frame_nm * NM / params.pixels
    required = tuple(math.ceil(a.required_side_m / px_m - 1e-6) for a in ACTIONS)
    reset = np.zeros(N_ACTIONS, bool)
    reset[list(RESET_ACTIONS)] = True
    jitter = inspect.signature(jitter_probe).parameters["scale"].default
    return Tables(jnp.asarray(fix), jnp.asarray(damage), jnp.asarray(damage_kind), jnp.asarray(stall),
                  _severity_slope(), jnp.asarray(spontaneous), jnp.asarray(to_good), jnp.asarray(degrade),
                  float(jitter), jnp.asarray(reset), required, _bank())


# --- dynamics --------------------------------------------------------------------------------------------------


def _area_density(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    c = SampleConfig()
    return c.molecule_density_per_nm2 * jnp.exp(c.molecule_density_spread * jax.random.normal(key, shape))


def draw_probes(key: jax.Array, kinds: jax.Array, t: Tables) -> ProbeBatch:
    """Fresh probes of the given kinds (any batch shape), drawn from the bank; density left at 0."""
    rows = jax.random.randint(key, kinds.shape, 0, BANK_SIZE)
    return jax.tree.map(lambda leaf: leaf[kinds, rows], t.bank)


def _select(mask: jax.Array, a: ProbeBatch, b: ProbeBatch) -> ProbeBatch:
    def pick(x: jax.Array, y: jax.Array) -> jax.Array:
        m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
        return jnp.where(m, x, y)

    return ProbeBatch(*(pick(x, y) for x, y in zip(a, b)))


def initial_probes(key: jax.Array, n: int, t: Tables) -> ProbeBatch:
    """`n` good probes (a training run starts from a good probe and damages it) on areas of random density."""
    k1, k2 = jax.random.split(key)
    probes = draw_probes(k1, jnp.full((n,), GOOD, jnp.int32), t)
    return probes._replace(density=_area_density(k2, (n,)))


def _jitter(key: jax.Array, p: ProbeBatch, scale: float) -> ProbeBatch:
    k1, k2 = jax.random.split(key)
    f = 1.0 + scale * jax.random.normal(k1, p.kernel.shape)
    g = 1.0 + scale * jax.random.normal(k2, p.kernel.shape)
    main = p.kernel == 0
    dx = jnp.where(main, p.apex[..., 0] * f, p.apex[..., 0])
    dy = jnp.where(main, p.apex[..., 1] * f, p.apex[..., 1])
    w = jnp.where(main, jnp.maximum(0.1, p.apex[..., 2] * g), p.apex[..., 2])
    return p._replace(apex=jnp.stack([dx, dy, w, p.apex[..., 3]], axis=-1))


def act(key: jax.Array, p: ProbeBatch, actions: jax.Array, t: Tables) -> ProbeBatch:
    """One conditioning action per environment (`conditioning.apply_event`'s draw, vectorised)."""
    k_u, k_kind, k_new, k_fix, k_jit = jax.random.split(key, 5)
    u = jax.random.uniform(k_u, actions.shape)
    good = p.kind == GOOD
    p_fix = jnp.where(good, 0.0, t.fix[p.kind, actions] * (1.0 - t.severity_slope * p.severity))
    p_dmg = t.damage[actions]
    fixed = u < p_fix
    damaged = ~fixed & (u < p_fix + (1.0 - p_fix) * p_dmg)
    new_kind = jax.random.categorical(k_kind, jnp.log(t.damage_kind[actions] + 1e-30))
    fresh = draw_probes(k_new, jnp.where(fixed, GOOD, new_kind).astype(jnp.int32), t)
    kept = _select(good, p, _jitter(k_jit, p, t.jitter_scale))
    out = _select(fixed | damaged, fresh._replace(density=p.density), kept)
    return _select(t.stall[actions], p, out)


def scan_changes(key: jax.Array, p: ProbeBatch, lines: float, t: Tables) -> ProbeBatch:
    """Spontaneous tip changes during `lines` scanned lines (`conditioning.spontaneous_change`, vectorised)."""
    k_u, k_g, k_kind, k_new = jax.random.split(key, 4)
    prob = 1.0 - (1.0 - t.spontaneous[p.kind]) ** (lines / 64.0)
    change = jax.random.uniform(k_u, p.kind.shape) < prob
    to_good = jax.random.uniform(k_g, p.kind.shape) < t.to_good[p.kind]
    other = jax.random.categorical(k_kind, jnp.log(t.degrade_kind[p.kind] + 1e-30))
    fresh = draw_probes(k_new, jnp.where(to_good, GOOD, other).astype(jnp.int32), t)
    return _select(change, fresh._replace(density=p.density), p)


def new_area(key: jax.Array, p: ProbeBatch, moved: jax.Array) -> ProbeBatch:
    """Environments with `moved` set are on a fresh approach area (a new molecule density)."""
    return p._replace(density=jnp.where(moved, _area_density(key, p.density.shape), p.density))


# --- rendering -------------------------------------------------------------------------------------------------


def _components(key: jax.Array, density: jax.Array, half: float, candidates: int = CANDIDATE_SLOTS,
                molecules: int = MOLECULE_SLOTS, adatoms: int = ADATOM_SLOTS) -> tuple[jax.Array, ...]:
    """Gaussian components (x, y, sigma in nm; amplitude in Angstrom) in a square window of half-side `half` nm
    (the frame's plus the margin), fixed slots."""
    area = (2 * half) ** 2
    core_nm = MOLECULE_HARD_CORE_M / NM
    core = math.pi * core_nm**2
    k_n, k_xy, k_dom, k_ang, k_mark, k_ad, k_adxy, k_adamp = jax.random.split(key, 8)
    target = jnp.minimum(density * core, 0.95)
    lam = -jnp.log1p(-target) / core * area
    n = jnp.minimum(jax.random.poisson(k_n, lam), candidates)
    xy = jax.random.uniform(k_xy, (candidates, 2), minval=-half, maxval=half)
    active = jnp.arange(candidates) < n
    mark = jnp.where(active, jax.random.uniform(k_mark, (candidates,)), 2.0)
    d2 = jnp.sum(jnp.square(xy[:, None, :] - xy[None, :, :]), axis=-1)
    beaten = (d2 < core_nm**2) & (mark[None, :] < mark[:, None])
    keep = active & ~jnp.any(beaten, axis=1)
    order = jnp.argsort(~keep, stable=True)[:molecules]
    mxy, mkeep = xy[order], keep[order]
    domain = jnp.where(jax.random.uniform(k_dom, (molecules,)) < 0.5, 1.0, -1.0)
    angle = domain * math.radians(22.5) + jax.random.normal(k_ang, (molecules,)) * math.radians(3.0)
    lobe = angle[:, None] + jnp.arange(4)[None, :] * (math.pi / 2)
    r = LOBE_RADIUS_M / NM
    lx = (mxy[:, 0:1] + r * jnp.cos(lobe)).ravel()
    ly = (mxy[:, 1:2] + r * jnp.sin(lobe)).ravel()
    on = jnp.repeat(mkeep, 4)
    c = SampleConfig()
    n_ad = jnp.minimum(jax.random.poisson(k_ad, c.adatom_density_per_nm2 * area), adatoms)
    ad_xy = jax.random.uniform(k_adxy, (adatoms, 2), minval=-half, maxval=half)
    ad_amp = jax.random.uniform(k_adamp, (adatoms,), minval=ADATOM_AMP_A[0], maxval=ADATOM_AMP_A[1])
    ad_on = jnp.arange(adatoms) < n_ad
    cx = jnp.concatenate([lx, mxy[:, 0], ad_xy[:, 0]])
    cy = jnp.concatenate([ly, mxy[:, 1], ad_xy[:, 1]])
    sig = jnp.concatenate([jnp.full(4 * molecules, LOBE_SIGMA_M / NM), jnp.full(molecules, CENTRE_SIGMA_M / NM),
                           jnp.full(adatoms, ADATOM_SIGMA_NM)])
    amp = jnp.concatenate([jnp.where(on, LOBE_AMP_M / ANGSTROM, 0.0), jnp.where(mkeep, CENTRE_AMP_M / ANGSTROM, 0.0),
                           jnp.where(ad_on, ad_amp, 0.0)])
    return cx, cy, sig, amp


def _step_edge(u: jax.Array, params: EnvParams) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A straight monatomic step crossing the frame with the probability a 150 nm mean terrace width gives, from 4
    uniforms (on, angle, offset, sign): (nx, ny, offset nm, height A; 0 without a step)."""
    c = SampleConfig()
    radius = params.frame_nm / math.sqrt(2.0)
    p_step = 2 * radius / (c.mean_terrace_width_m / NM)
    u_on, u_ang, u_off, u_sign = u
    theta = u_ang * (2 * math.pi)
    offset = (2.0 * u_off - 1.0) * radius
    height = jnp.where(u_sign < 0.5, 1.0, -1.0) * (AG100_STEP_M / ANGSTROM)
    height = jnp.where(u_on < p_step, height, 0.0)
    return jnp.cos(theta), jnp.sin(theta), offset, height


class Layouts(NamedTuple):
    """Clean substrates rendered once per parameter set: `LAYOUTS` molecule/adatom layouts drawn from the sample's
    constants (stratified over the per-area density), each blurred at `WIDTH_BINS` apex widths (heights in A)."""

    canvas: jax.Array  # (layouts, widths, pixels + 2 pad, pixels + 2 pad) float32: the frame and PAD_PX around it
    centre: jax.Array  # (layouts, widths, pixels, pixels) float16: the frame itself (an apex without offset)
    boltzmann: jax.Array  # float16 exp(beta canvas): what a displaced apex adds to the tunnelling sum
    widths: jax.Array  # (widths,) nm, geometric
    noise: jax.Array  # (NOISE_ROWS, pixels): white-noise rows, N(0, 1)


def layouts(params: EnvParams | None = None) -> Layouts:
    """The bank of pre-rendered substrates (cached per parameter set; concrete even when called under jit)."""
    with jax.ensure_compile_time_eval():
        return _layouts(params or EnvParams())


@lru_cache(maxsize=4)
def _layouts(params: EnvParams) -> Layouts:
    n, px = params.pixels, params.frame_nm / params.pixels
    side = n + 2 * PAD_PX
    half = side * px / 2 + params.margin_nm
    c = SampleConfig()
    core = math.pi * (MOLECULE_HARD_CORE_M / NM) ** 2
    # stratified densities: layout i sits at the density quantile (i + 0.5) / LAYOUTS (strata are consecutive runs)
    q = (np.arange(LAYOUTS) + 0.5) / LAYOUTS
    density = c.molecule_density_per_nm2 * np.exp(c.molecule_density_spread * np.sqrt(2.0) * _erfinv(2 * q - 1))
    lam = -np.log1p(-np.minimum(density * core, 0.95)) / core * (2 * half) ** 2
    candidates = int(np.ceil(lam.max() + 6 * np.sqrt(lam.max())))
    axis = jnp.asarray((np.arange(side) + 0.5) * px - side * px / 2, jnp.float32)
    widths = jnp.asarray(np.geomspace(WIDTH_RANGE_NM[0], WIDTH_RANGE_NM[1], WIDTH_BINS), jnp.float32)
    root = jax.random.key(_LAYOUT_PURPOSE)

    def one(i: jax.Array, d: jax.Array) -> jax.Array:
        cx, cy, sig, amp = _components(jax.random.fold_in(root, i), d, half, candidates, candidates // 2, 8)
        var = sig[None, :] ** 2 + widths[:, None] ** 2  # (widths, comps)
        a = amp[None, :] * sig[None, :] ** 2 / var
        gx = jnp.exp(-0.5 * jnp.square(axis[None, None, :] - cx[None, :, None]) / var[..., None])
        gy = jnp.exp(-0.5 * jnp.square(axis[None, None, :] - cy[None, :, None]) / var[..., None])
        return jnp.einsum("wcv,wcu->wvu", gy, gx * a[..., None])

    canvas = jax.lax.map(lambda x: one(*x), (jnp.arange(LAYOUTS), jnp.asarray(density, jnp.float32)))
    noise = jax.random.normal(jax.random.fold_in(root, LAYOUTS), (NOISE_ROWS, n))
    # the banks a frame reads in float16 (half the memory traffic of the gathers; relative error 5e-4, i.e. <= 1.5 pm
    # in a 3 A height, 0.2 pm through exp(beta h)); the float32 canvas stays for inspection
    centre = canvas[:, :, PAD_PX:PAD_PX + n, PAD_PX:PAD_PX + n].astype(jnp.float16)
    return Layouts(canvas, centre, jnp.exp(_BETA_PER_A * canvas).astype(jnp.float16), widths, noise)


def _erfinv(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.scipy.special.erfinv(jnp.asarray(x, jnp.float32)), np.float64)


def _width_bin(w: jax.Array, lay: Layouts) -> tuple[jax.Array, jax.Array]:
    """(lower bin, fraction toward the next) of apex widths on the bank's geometric grid, clipped to its range."""
    ratio = jnp.log(lay.widths[1] / lay.widths[0])
    f = jnp.clip(jnp.log(jnp.maximum(w, 1e-6) / lay.widths[0]) / ratio, 0.0, WIDTH_BINS - 1.0)
    lo = jnp.minimum(jnp.floor(f), WIDTH_BINS - 2.0)
    return lo.astype(jnp.int32), f - lo


_ROW_GATHER = jax.lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0, 1, 2), start_index_map=(0, 1, 2, 3))


def _unit(bits: jax.Array) -> jax.Array:
    """Uniform [0, 1) floats from uint32 bits (`jax.random.uniform`'s mantissa construction)."""
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def _randint(u: jax.Array, high: int | jax.Array) -> jax.Array:
    """Integers in [0, high) from uniforms in [0, 1)."""
    return jnp.minimum(jnp.floor(u * high), high - 1).astype(jnp.int32)


def render_one(key: jax.Array, p: ProbeBatch, params: EnvParams = EnvParams(), lay: Layouts | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """One levelled, normalised frame (pixels, pixels) float32 and its clean-substrate mask, for one probe
    (`p` without a batch axis); `lay` defaults to `layouts(params)`."""
    lay = layouts(params) if lay is None else lay
    n, px = params.pixels, params.frame_nm / params.pixels
    c = SampleConfig()
    slots = APEX_SLOTS
    # every random number of the frame from one threefry call (one call per draw cost more than the rest of the
    # frame's randomness): uniforms by the mantissa construction, normals by erfinv, as jax.random draws them
    u = _unit(jax.random.bits(key, (7 * n + slots + 8,), jnp.uint32))
    u_row = u[:7 * n].reshape(7, n)
    u_flick, u_on, u_col, u_len, u_amp, u_sign, u_walk = u_row
    u_round = u[7 * n:7 * n + slots - 1]
    u_lay, u_start, u_nsign = u[7 * n + slots - 1:7 * n + slots + 2]
    u_edge = u[7 * n + slots + 2:7 * n + slots + 6]
    # the layout: a random one of the density stratum of this area's density
    quantile = jax.scipy.stats.norm.cdf(jnp.log(p.density / c.molecule_density_per_nm2) / c.molecule_density_spread)
    per = LAYOUTS // DENSITY_STRATA
    stratum = jnp.clip(jnp.floor(quantile * DENSITY_STRATA), 0, DENSITY_STRATA - 1).astype(jnp.int32)
    layout = stratum * per + _randint(u_lay, per)
    dx, dy, w, weight = (p.apex[:, i] for i in range(4))
    lo, frac = _width_bin(w, lay)
    # slot 0 (the main apex, never displaced): the frame's centre, widths interpolated (heights, then one exp)
    a0 = lay.centre[layout, lo[0]].astype(jnp.float32)
    layer0 = a0 + frac[0] * (lay.centre[layout, lo[0] + 1].astype(jnp.float32) - a0)
    # the other slots: an integer-pixel crop of the Boltzmann bank exp(beta h) at the apex's offset, the width bin
    # rounded stochastically; an empty slot reads the main apex's rows (one read from memory, the others cached)
    used = weight > 0
    b = jnp.where(used[1:], lo[1:] + (u_round < frac[1:]).astype(jnp.int32), lo[0])
    ox = jnp.where(used[1:], jnp.clip(jnp.round(dx[1:] / px), -PAD_PX, PAD_PX).astype(jnp.int32), 0) + PAD_PX
    oy = jnp.where(used[1:], jnp.clip(jnp.round(dy[1:] / px), -PAD_PX, PAD_PX).astype(jnp.int32), 0) + PAD_PX
    # a gather of whole rows (XLA's CPU gather copies contiguous slices fast; dynamic_slice under vmap is ~9x slower)
    rows = oy[:, None] + jnp.arange(n)[None, :]  # (slots - 1, n)
    idx = jnp.stack([jnp.broadcast_to(layout, rows.shape), jnp.broadcast_to(b[:, None], rows.shape), rows,
                     jnp.broadcast_to(ox[:, None], rows.shape)], axis=-1)
    crops = jax.lax.gather(lay.boltzmann, idx, _ROW_GATHER, (1, 1, 1, n), mode="promise_in_bounds").astype(jnp.float32)
    e = jnp.concatenate([jnp.exp(_BETA_PER_A * layer0)[None], crops])  # (slots, rows = v, cols = u): exp(beta h)
    # the tunnelling sum over the apices of each line's kernel (`render.render_topography`), normalised weights;
    # the flicker switches kernels in bands of lines
    flips = u_flick < p.flicker_rate
    has_flicker = jnp.any(used & (p.kernel == 1))
    row_kernel = jnp.where(has_flicker, jnp.cumsum(flips) % 2, 0)
    wk = jnp.where(used[None, :] & (p.kernel[None, :] == row_kernel[:, None]), weight[None, :], 0.0)  # (rows, slots)
    wk = wk / jnp.maximum(jnp.sum(wk, axis=1, keepdims=True), 1e-12)
    topo = jnp.log(jnp.maximum(jnp.sum(wk.T[:, :, None] * e, axis=0), 1e-30)) / _BETA_PER_A
    # no molecule under any apex: every used layer below 0.05 A (exp(beta h) below exp(beta 0.05))
    bare = jnp.all(~used[:, None, None] | (e < math.exp(_BETA_PER_A * 0.05)), axis=0)
    # the step edge, blurred by the main apex
    nx, ny, off, h = _step_edge(u_edge, params)
    axis = (jnp.arange(n, dtype=jnp.float32) + 0.5) * px - params.frame_nm / 2
    edge = jnp.sqrt(jnp.square(w[0]) + (STEP_EDGE_WIDTH_M / NM) ** 2)
    dist = nx * axis[None, :] + ny * axis[:, None] - off
    terrace = (0.5 * h) * (1.0 + jax.lax.erf(dist * (1.0 / (math.sqrt(2.0) * edge))))  # the normal cdf via erf
    # streaks: at most one per line, start column uniform, geometric length (mean 6), exponential tail
    on_row = u_on < 1.0 - jnp.exp(-p.streak_rate)
    col0 = _randint(u_col, n)
    length = jnp.floor(jnp.log(jnp.maximum(u_len, 1e-7)) / math.log(1 - 1 / 6)) + 1
    amp_s = (0.5 + 2.0 * u_amp) * jnp.where(u_sign < 0.7, 1.0, -0.6)
    k = jnp.arange(n)[None, :] - col0[:, None]
    in_streak = on_row[:, None] & (k >= 0) & (k < length[:, None])
    streak = jnp.where(in_streak, amp_s[:, None] * jnp.exp(-k / jnp.maximum(1.0, length[:, None] / 2.0)), 0.0)
    # white noise: a random block of rows of the bank's noise, random sign; the per-line random walk
    sign = jnp.where(u_nsign < 0.5, -1.0, 1.0)
    noise = jax.lax.dynamic_slice(lay.noise, (_randint(u_start, NOISE_ROWS - n + 1), 0), (n, n))
    noise = noise * (sign * p.noise_a)
    step_normal = math.sqrt(2.0) * jax.scipy.special.erfinv(jnp.maximum(2.0 * u_walk - 1.0, np.nextafter(np.float32(-1), 0)))
    walk = jnp.cumsum(step_normal) * p.line_noise_a
    z = topo + terrace + streak + noise + walk[:, None]
    # level: least-squares plane over the clean substrate of the larger terrace
    upper = dist > 0.0
    upper_side = jnp.where(h != 0, jnp.mean(upper) > 0.5, False)
    on_terrace = jnp.where(upper_side, upper, ~upper)
    clean = bare & jnp.where(h != 0, on_terrace, True)
    clean = jnp.where(jnp.sum(clean) >= 3, clean, jnp.ones_like(clean))
    levelled = level_plane(z, clean)
    normalised = jnp.clip(levelled - 1.0, -CLIP_LIMIT, CLIP_LIMIT)
    empty = jnp.abs(normalised + 1.0) <= EMPTY_TOLERANCE + 1e-6
    border = (jnp.arange(n) == 0) | (jnp.arange(n) == n - 1)
    empty = empty & ~border[:, None] & ~border[None, :]
    return normalised.astype(jnp.float32), empty


def level_plane(z: jax.Array, clean: jax.Array) -> jax.Array:
    """`z` (n, n) minus its least-squares plane over the pixels where `clean` is set (coordinates centred on those
    pixels' mean, so the normal equations split into the mean and a 2 x 2 system for the slopes; no LU)."""
    n = z.shape[-1]
    wts = clean.astype(jnp.float32)
    idx_f = jnp.arange(n, dtype=jnp.float32) - n / 2
    w_row, w_col = jnp.sum(wts, axis=1), jnp.sum(wts, axis=0)
    s0 = jnp.sum(w_row)
    r = idx_f - jnp.dot(w_row, idx_f) / s0  # (rows,) centred
    col = idx_f - jnp.dot(w_col, idx_f) / s0  # (cols,) centred
    wz = wts * z
    wz_row = jnp.sum(wz, axis=1)
    srr = jnp.dot(w_row, r * r) + 1e-6
    scc = jnp.dot(w_col, col * col) + 1e-6
    src = jnp.dot(r, wts @ col)
    szr, szc = jnp.dot(wz_row, r), jnp.dot(jnp.sum(wz, axis=0), col)
    det = srr * scc - src * src
    slope_r = (szr * scc - szc * src) / det
    slope_c = (szc * srr - szr * src) / det
    return z - (jnp.sum(wz_row) / s0 + slope_r * r[:, None] + slope_c * col[None, :])


def _erode(x: jax.Array, side: int, axis: int) -> jax.Array:
    """all(x[i : i + side]) along `axis` for every start i (length n - side + 1): windows of doubling length,
    then two overlapping ones."""
    length = 1
    while 2 * length <= side:
        m = x.shape[axis]
        x = jax.lax.slice_in_dim(x, 0, m - length, axis=axis) & jax.lax.slice_in_dim(x, length, m, axis=axis)
        length *= 2
    m, out = x.shape[axis], x.shape[axis] - (side - length)
    return jax.lax.slice_in_dim(x, 0, out, axis=axis) & jax.lax.slice_in_dim(x, side - length, m, axis=axis)


def _shift_down(words: jax.Array, bits: int) -> jax.Array:
    """The bit string `words` (..., W) uint32, bit i of word j = column 32 j + i, shifted toward column 0 by `bits`
    (zeros enter at the top)."""
    q, r = divmod(bits, 32)
    m = words.shape[-1]
    zeros = jnp.zeros(words.shape[:-1] + (q + 1,), words.dtype)
    x = jnp.concatenate([words[..., q:], zeros], axis=-1)  # x[j] = words[j + q]
    if r == 0:
        return x[..., :m]
    return (x[..., :m] >> r) | (x[..., 1:m + 1] << (32 - r))


def _erode_bits(words: jax.Array, side: int) -> jax.Array:
    """Bit i := all(bits i .. i + side - 1) of a packed row (zeros past the row's end: a window that leaves it
    is not all set)."""
    length = 1
    while 2 * length <= side:
        words = words & _shift_down(words, length)
        length *= 2
    return words if side == length else words & _shift_down(words, side - length)


def allowed_actions(empty: jax.Array, t: Tables) -> jax.Array:
    """(..., N_ACTIONS) bool: the actions whose clean square fits the frame's largest empty square
    (`controller.locator`'s rule, by erosion with the square instead of its dynamic programme). The columns of a
    row are packed into the bits of uint32 words, so erosion along a row is a shift and an AND per word."""
    n = empty.shape[-1]
    words = -(-n // 32)
    padded = jnp.pad(empty, [(0, 0)] * (empty.ndim - 1) + [(0, 32 * words - n)])
    bits = padded.reshape(empty.shape[:-1] + (words, 32)).astype(jnp.uint32)
    packed = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)  # (..., rows, words)

    def fits(side: int) -> jax.Array:
        if side <= 0:
            return jnp.ones(empty.shape[:-2], bool)
        if side > n or side > empty.shape[-2]:
            return jnp.zeros(empty.shape[:-2], bool)
        return jnp.any(_erode(_erode_bits(packed, side), side, -2) != 0, axis=(-2, -1))

    fit = {s: fits(s) for s in sorted(set(t.required_px))}
    return jnp.stack([fit[s] for s in t.required_px], axis=-1)


def render(key: jax.Array, p: ProbeBatch, params: EnvParams = EnvParams()) -> tuple[jax.Array, jax.Array]:
    """Frames (N, pixels, pixels) and allowed-action masks (N, N_ACTIONS) for a batch of probes."""
    n = p.kind.shape[0]
    keys = jax.random.split(key, n)
    t = tables(params)

    def chunk(k: jax.Array, q: ProbeBatch) -> tuple[jax.Array, jax.Array]:
        frame, empty = render_one(k, q, params)
        return frame, allowed_actions(empty, t)

    # in chunks of RENDER_CHUNK frames: a chunk's intermediates stay in the CPU's cache (1024 frames at once were
    # 2.5x slower per frame than 64)
    return jax.lax.map(lambda x: chunk(*x), (keys, p), batch_size=min(n, RENDER_CHUNK))


def step(key: jax.Array, p: ProbeBatch, actions: jax.Array, params: EnvParams = EnvParams()
         ) -> tuple[ProbeBatch, jax.Array, jax.Array, ProbeBatch]:
    """Apply one action per environment, scan: returns (probes after the scan, frames, masks, probes seen).

    The frame shows the probe after the action and the creep frame's lines; the frame's own lines may change
    the probe afterwards (the next step starts from that)."""
    t = tables(params)
    k_act, k_creep, k_render, k_after = jax.random.split(key, 4)
    p = act(k_act, p, actions, t)
    p = scan_changes(k_creep, p, float(params.lines_per_step - params.pixels), t)
    frames, masks = render(k_render, p, params)
    after = scan_changes(k_after, p, float(params.pixels), t)
    return after, frames, masks, p


def is_good(p: ProbeBatch) -> jax.Array:
    """Ground truth (for statistics and reports only; training judges frames with the classifier)."""
    return p.kind == GOOD

