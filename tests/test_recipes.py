"""Training recipes (`deepspm train classifier --recipe`, controller/recipes.py), the augmentations they use
(nets/losses.py) and the fixed H:Si(100) hold-out (nets/data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepspm.controller.recipes import RECIPES, announce, choose_recipe, resolve
from deepspm.nets.classifier import ClassifierConfig, shift_output_bias, train_classifier
from deepspm.nets.data import hsi100_holdout_rows, load_hsi100_npz
from deepspm.nets.inference import Predictor
from deepspm.nets.losses import random_crops, random_dihedral
from deepspm.nets.model import NetDef
from tests.test_nets_ensemble import _small_hsi_npz

REAL = Path(__file__).parents[1] / ".." / "shared" / "data" / "hsi100_tipstates_64.npz"


def _folder_set(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("good", "bad"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            np.save(root / label / f"f{i}Ransac.npy", rng.normal(0, 1e-10, (64, 64)))
    return root


def test_auto_recipe_follows_the_data(tmp_path: Path) -> None:
    hsi = _small_hsi_npz(tmp_path / "hsi.npz", n=60)
    folders = _folder_set(tmp_path / "lab")
    assert choose_recipe("auto", [hsi])[0] is RECIPES["hsi100"]
    assert choose_recipe("auto", [folders])[0] is RECIPES["standard"]
    assert choose_recipe("auto", [hsi, hsi])[0] is RECIPES["standard"]  # not the H:Si set alone
    assert choose_recipe("auto", [hsi], init=True)[0] is RECIPES["standard"]
    assert choose_recipe("auto", [hsi], lines=True)[0] is RECIPES["standard"]
    assert choose_recipe("hsi100", [folders]) == (RECIPES["hsi100"], "asked for")
    with pytest.raises(ValueError, match="unknown recipe"):
        choose_recipe("best", [hsi])
    # the standard recipe is the paper's: today's defaults of the classifier config
    standard, config = RECIPES["standard"], ClassifierConfig()
    assert (standard.good_weight, standard.augment, standard.crop_min_scale, standard.lr_schedule, standard.ensemble) \
        == (config.good_weight, "flips", config.crop_min_scale, config.lr_schedule, None)


def test_given_options_override_the_recipe() -> None:
    recipe, overrides = resolve(RECIPES["hsi100"], {"epochs": 3, "preset": None, "good_weight": 8.0, "augment": "dihedral"})
    assert overrides == {"epochs": 3, "augment": "dihedral"}  # None = not given; equal to the recipe's = no override
    assert (recipe.epochs, recipe.augment, recipe.ensemble, recipe.name) == (3, "dihedral", 5, "hsi100")
    tta, overrides = resolve(RECIPES["hsi100"], {"combine": "dihedral-mean"})  # test-time views on request
    assert overrides == {"combine": "dihedral-mean"} and "(dihedral-mean)" in tta.describe()
    assert "good weight 8 (prior-corrected" in RECIPES["hsi100"].describe()
    assert "ensemble of 5 wide nets" in RECIPES["hsi100"].describe()  # measured better out of fold than compact
    # six-class members are unweighted sigmoids: the printed line must not claim a weight in force
    six = announce(RECIPES["hsi100"], "auto", {}, multiclass=True)
    assert "good weight 8" not in six and "six unweighted sigmoids" in six and "ensemble of 5" in six
    assert all(r.ensemble for r in RECIPES.values() if r.prior_correction)  # the single-net path has no correction


def test_dihedral_gives_the_eight_symmetries_evenly() -> None:
    image = jnp.arange(16.0).reshape(1, 4, 4, 1)
    out = np.asarray(random_dihedral(jnp.repeat(image, 4000, axis=0), jax.random.key(0)))
    a = np.asarray(image[0, :, :, 0])
    group = [np.rot90(a, k) for k in range(4)] + [np.rot90(a.T, k) for k in range(4)]
    which = [next(i for i, g in enumerate(group) if np.array_equal(o[:, :, 0], g)) for o in out]
    counts = np.bincount(which, minlength=8)
    assert counts.sum() == 4000 and counts.min() > 400 and counts.max() < 600  # 500 each expected


def test_random_crops_zoom_into_the_image() -> None:
    ramp = jnp.broadcast_to(jnp.arange(64.0)[None, :, None, None], (8, 64, 64, 1))  # value = row index
    assert random_crops(ramp, jax.random.key(1), 1.0) is ramp
    out = np.asarray(random_crops(ramp, jax.random.key(1), 0.5))
    assert out.shape == ramp.shape
    span = out[:, -1, 0, 0] - out[:, 0, 0, 0]  # a crop of side c spans about c - 1 rows over the 64 output rows
    assert np.all(span > 0.5 * 64 - 3) and np.all(span < 63.5) and np.ptp(span) > 1  # crops differ per image
    assert np.all(out >= -1e-4) and np.all(out <= 63 + 1e-4)  # inside the image: no padding
    with pytest.raises(ValueError, match="crop_min_scale"):
        ClassifierConfig(crop_min_scale=0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        ClassifierConfig(lr_schedule="step")


def test_prior_correction_moves_the_logit_by_minus_log_of_the_good_weight() -> None:
    net = NetDef.of("tiny", 2)
    variables = net.init(jax.random.key(0))
    images = np.random.default_rng(1).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    raw = Predictor(net, variables, "values")(images)
    np.testing.assert_allclose(Predictor(net, shift_output_bias(variables, -0.5), "values")(images), raw - 0.5,
                               atol=1e-5)
    # the same training with and without the correction: the weights differ by the shift alone
    rng = np.random.default_rng(2)
    labels = (rng.random(40) < 0.5).astype(np.int64)
    data = rng.uniform(-1, 1, (40, 64, 64)).astype(np.float32) * 0.2 + labels[:, None, None] * 0.5
    kwargs = dict(good_weight=8.0, batch_size=16, val_fraction=0.25)
    plain = train_classifier(data, labels, "tiny", 1, 3, config=ClassifierConfig(**kwargs), progress=False)
    fixed = train_classifier(data, labels, "tiny", 1, 3, config=ClassifierConfig(prior_correction=True, **kwargs),
                             progress=False)
    logits = [Predictor(r.net, r.variables, "values")(data[:8])[:, 0] for r in (plain, fixed)]
    np.testing.assert_allclose(logits[1], logits[0] - np.log(8.0), atol=1e-4)
    assert fixed.metrics["roc_auc"] == pytest.approx(plain.metrics["roc_auc"])  # the ranking is unchanged
    with pytest.raises(ValueError, match="good_weight > 0"):
        ClassifierConfig(prior_correction=True, good_weight=0.0)


def test_hsi100_holdout_is_fixed_and_stratified(tmp_path: Path) -> None:
    path = _small_hsi_npz(tmp_path / "hsi.npz", 100)
    rows = hsi100_holdout_rows(path)
    np.testing.assert_array_equal(rows, hsi100_holdout_rows(path))
    assert np.all(np.diff(rows) > 0)
    binary = load_hsi100_npz(path)
    held = np.isin(binary.indices, rows)
    for label in (0, 1):  # 20 % of each binary class, rounded
        assert held[binary.labels == label].sum() == round(0.2 * (binary.labels == label).sum())
    assert hsi100_holdout_rows(path, seed=1).tolist() != rows.tolist()


def _train(args: list[str]) -> int:
    from deepspm.cli import main

    return main(["train", "classifier", *args])


def _check_default_run(data: Path, out: Path, capsys: pytest.CaptureFixture[str], more: tuple[str, ...] = ()) -> None:
    """The default command (only the size of the nets and the epochs cut down, and `more`) picks hsi100 and
    trains it end to end."""
    assert _train(["--data", str(data), "--out", str(out), "--preset", "tiny", "--epochs", "1", *more]) == 0
    printed = capsys.readouterr().out
    assert "recipe hsi100 (auto: the data is the H:Si(100) tip-state set)" in printed
    assert "overridden: preset=tiny, epochs=1" in printed
    meta = json.loads((out / "meta" / "metadata").read_text())
    recipe = meta["metadata"]["recipe"]
    k = int(more[1]) if more else RECIPES["hsi100"].ensemble
    given = {"preset": "tiny", "epochs": 1, **({"ensemble": k} if more else {})}
    assert recipe["name"] == "hsi100" and recipe["overridden"] == given
    assert recipe["settings"]["augment"] == "flips" and recipe["settings"]["lr_schedule"] == "cosine"
    assert recipe["settings"]["good_weight"] == 8.0 and recipe["settings"]["prior_correction"] is True
    assert meta["metadata"]["options"]["prior_correction"] is True
    assert meta["ensemble"] == {"k": k, "combine": "mean"}
    assert meta["metadata"]["options"]["holdout"] == "hsi100_fixed"
    kept = load_hsi100_npz(data).indices
    split = json.loads((out / "split.json").read_text())["val_indices"]
    assert kept[split].tolist() == [r for r in hsi100_holdout_rows(data).tolist() if r in set(kept.tolist())]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["roc_auc"] <= 1.0 and len(metrics["member_metrics"]) == k


def test_default_command_trains_the_hsi100_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_default_run(_small_hsi_npz(tmp_path / "hsi.npz", n=60), tmp_path / "ckpt", capsys, ("--ensemble", "2"))


@pytest.mark.skipif(not REAL.is_file(), reason="needs ../shared/data (the real H:Si(100) set)")
def test_default_command_on_real_hsi_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with np.load(REAL) as npz:
        rows = np.r_[0:160]  # a few real images, in the set's own layout
        np.savez(tmp_path / "real.npz", **{k: npz[k] if k == "categories" else npz[k][rows] for k in npz.files})
    _check_default_run(tmp_path / "real.npz", tmp_path / "ckpt", capsys)


def test_a_single_net_takes_the_augmentations_and_records_its_recipe(tmp_path: Path) -> None:
    import json

    folders = _folder_set(tmp_path / "lab")
    assert _train(["--data", str(folders), "--out", str(tmp_path / "a"), "--preset", "tiny", "--epochs", "1",
                   "--augment", "dihedral", "--crop-min-scale", "0.8", "--lr-schedule", "cosine"]) == 0
    summary = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert summary["recipe"]["name"] == "standard"
    assert {k: summary["options"][k] for k in ("dihedral", "crop_min_scale", "lr_schedule")} == {
        "dihedral": True, "crop_min_scale": 0.8, "lr_schedule": "cosine"}


def test_single_net_options_refused_by_an_ensemble_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hsi = _small_hsi_npz(tmp_path / "hsi.npz", n=60)
    assert _train(["--data", str(hsi), "--out", str(tmp_path / "b"), "--max-train", "10"]) == 2
    assert "--recipe standard" in capsys.readouterr().err
