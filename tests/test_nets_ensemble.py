"""Ensembles (deepspm.nets.ensemble), calibration (nets.metrics), the tip-state category table (nets.data) and
`deepspm train classifier --ensemble` / `evaluate classifier --plots`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from deepspm.nets import inference
from deepspm.nets.checkpoint_info import CheckpointError
from deepspm.nets.checkpoints import load_net, save_net
from deepspm.nets.classifier import ClassifierConfig
from deepspm.nets.data import (
    GORDON2020_CATEGORIES,
    HSI100_CATEGORIES,
    HSI100_TO_GORDON2020,
    DataError,
    binary_from_multiclass,
    four_categories,
)
from deepspm.nets.ensemble import (
    EnsembleDef,
    EnsembleError,
    dihedral_views,
    member_variables,
    require_single,
    stack_members,
    train_ensemble,
)
from deepspm.nets.inference import Predictor
from deepspm.nets.metrics import calibration, multilabel_metrics, with_calibration
from deepspm.nets.model import NetDef


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def three() -> tuple[NetDef, list]:
    net = NetDef.of("tiny", 3)
    return net, [net.init(jax.random.key(seed)) for seed in (0, 1, 2)]


def test_ensemble_is_the_mean_of_its_members_in_one_trace(three) -> None:
    net, members = three
    ensemble = Predictor(EnsembleDef.of_member(net, 3, "mean"), stack_members(members), "probability")
    images = _images(4, 0)
    expected = np.mean([Predictor(net, m, "probability")(images) for m in members], axis=0)
    np.testing.assert_allclose(ensemble(images), expected, atol=1e-6)
    ensemble(_images(4, 1))
    ensemble.predict_batched(_images(9, 2), batch_size=4)
    assert ensemble.traces["forward"] == 1  # one function for all members and calls of batch 4
    assert ensemble(images).shape == (4, 3)


@pytest.mark.parametrize("rule", ["mean", "vote", "dihedral-mean"])
def test_unrolled_and_vmapped_members_agree(three, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the members are unrolled inside the one call (faster there), on an accelerator vmapped: the same
    outputs either way."""
    net, members = three
    images = _images(4, 5)
    out = {}
    for unroll in (True, False):
        monkeypatch.setattr(inference, "UNROLL_MEMBERS_ON_CPU", unroll)
        predictor = Predictor(EnsembleDef.of_member(net, 3, rule), stack_members(members), "probability")
        out[unroll] = predictor(images)
        assert predictor.traces["forward"] == 1
    np.testing.assert_allclose(out[True], out[False], atol=1e-6)


def test_vote_is_the_fraction_of_members_above_one_half(three) -> None:
    net, members = three
    vote = Predictor(EnsembleDef.of_member(net, 3, "vote"), stack_members(members), "probability")
    images = _images(5, 3)
    each = np.stack([Predictor(net, m, "probability")(images) for m in members])
    np.testing.assert_allclose(vote(images), (each > 0.5).mean(axis=0), atol=1e-6)


def _symmetries(images: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square of (B, S, S) images, by numpy (rotations of the image and its mirror)."""
    return [np.rot90(base, k, axes=(1, 2)) for base in (images, images[:, :, ::-1]) for k in range(4)]


def test_dihedral_views_are_the_8_symmetries_view_major() -> None:
    images = _images(3, 6)[..., None]
    views = np.asarray(dihedral_views(images))[..., 0]
    assert views.shape == (24, 64, 64)
    got = {views[v * 3 + b].tobytes() for v in range(8) for b in range(3)}
    assert got == {view[b].tobytes() for view in _symmetries(images[..., 0]) for b in range(3)}
    np.testing.assert_array_equal(views[:3], images[..., 0])  # view 0 is the image itself
    assert len({views[v * 3].tobytes() for v in range(8)}) == 8  # a generic image has 8 distinct views


def test_dihedral_mean_averages_members_over_the_8_symmetries_in_one_call(three) -> None:
    net, members = three
    tta = Predictor(EnsembleDef.of_member(net, 3, "dihedral-mean"), stack_members(members), "probability")
    images = _images(4, 7)
    singles = [Predictor(net, m, "probability") for m in members]
    expected = np.mean([p(view) for p in singles for view in _symmetries(images)], axis=0)
    np.testing.assert_allclose(tta(images), expected, atol=1e-6)
    plain = Predictor(EnsembleDef.of_member(net, 3, "mean"), stack_members(members), "probability")
    assert np.abs(plain(images) - expected).max() > 1e-4  # the views change the score of an untrained net
    # invariant under the symmetries it averages over; batch 1 (a run's frame) and predict_batched agree
    for view in _symmetries(images)[1:]:
        np.testing.assert_allclose(tta(view.copy()), tta(images), atol=1e-6)
    np.testing.assert_allclose(tta(images[:1]), expected[:1], atol=1e-6)
    np.testing.assert_allclose(tta.predict_batched(images, batch_size=3), expected, atol=1e-6)
    assert tta.traces["forward"] == 3  # batch sizes 4, 1 and 3, each traced once


def test_dihedral_vote_counts_every_member_and_view(three) -> None:
    net, members = three
    vote = Predictor(EnsembleDef.of_member(net, 3, "dihedral-vote"), stack_members(members), "probability")
    images = _images(5, 8)
    each = np.stack([Predictor(net, m, "probability")(view) for m in members for view in _symmetries(images)])
    np.testing.assert_allclose(vote(images), (each > 0.5).mean(axis=0), atol=1e-6)
    assert EnsembleDef.of_member(net, 3, "dihedral-vote").views == 8 and EnsembleDef.of_member(net, 3).views == 1


def test_single_output_ensemble_squeezes_like_a_single_net() -> None:
    net = NetDef.of("tiny", 1)
    ens = EnsembleDef.of_member(net, 2)
    variables = ens.init(jax.random.key(0))
    assert jax.tree.leaves(variables)[0].shape[0] == 2
    np.testing.assert_allclose(Predictor(net, member_variables(variables, 1))(_images(2, 0)).shape, (2,))
    assert Predictor(ens, variables)(_images(2, 0)).shape == (2,)


def test_ensemble_checkpoint_round_trip(tmp_path: Path, three) -> None:
    net, members = three
    ens = EnsembleDef.of_member(net, 3, "vote")
    path = save_net(tmp_path / "ens", ens, stack_members(members), kind="classifier", metadata={"note": 1})
    ckpt = load_net(path, expect_kind="classifier")
    assert ckpt.net == ens and isinstance(ckpt.net, EnsembleDef) and ckpt.metadata == {"note": 1}
    images = _images(3, 4)
    np.testing.assert_allclose(Predictor(ckpt.net, ckpt.variables)(images),
                               Predictor(ens, stack_members(members))(images), atol=1e-6)
    single = load_net(save_net(tmp_path / "one", net, members[0], kind="classifier"))
    assert type(single.net) is NetDef
    tta = EnsembleDef.of_member(net, 3, "dihedral-mean")  # the views travel with the checkpoint
    back = load_net(save_net(tmp_path / "tta", tta, stack_members(members), kind="classifier"))
    assert back.net == tta and back.net.views == 8
    np.testing.assert_allclose(Predictor(back.net, back.variables)(images),
                               Predictor(tta, stack_members(members))(images), atol=1e-6)


def test_bad_ensembles_are_refused(three) -> None:
    net, members = three
    with pytest.raises(EnsembleError, match="at least one member"):
        EnsembleDef.of_member(net, 0)
    with pytest.raises(EnsembleError, match="combination rule"):
        EnsembleDef.of_member(net, 2, "median")
    with pytest.raises(EnsembleError, match="no members"):
        stack_members([])
    with pytest.raises(EnsembleError, match="differ in structure"):
        stack_members([members[0], NetDef.of("tiny", 1).init(jax.random.key(0))])
    with pytest.raises(CheckpointError, match="single net"):
        require_single(EnsembleDef.of_member(net, 2), "fine-tuning")
    assert require_single(net, "x") is net


def test_train_ensemble_holds_out_rows_and_varies_member_splits() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(60) < 0.5).astype(np.int64)
    images = _images(60, 5) * 0.1 + labels[:, None, None] * 0.5
    result = train_ensemble(images, labels, "tiny", 1, 7, 2, holdout_fraction=0.25,
                            config=ClassifierConfig(batch_size=16, val_fraction=0.25), progress=False)
    assert result.seeds == [7, 8] and result.net.k == 2
    held = set(result.holdout_indices.tolist())
    assert len(held) == 15 and held.isdisjoint(result.pool_indices.tolist())
    for m in result.members:
        assert held.isdisjoint(m.train_indices.tolist()) and held.isdisjoint(m.val_indices.tolist())
    assert result.members[0].val_indices.tolist() != result.members[1].val_indices.tolist()
    summary = result.summary()
    assert [m["seed"] for m in summary["members"]] == [7, 8] and summary["combine"] == "mean"
    ens = Predictor(result.net, result.variables)(images[:4])
    np.testing.assert_allclose(ens, np.mean([m.predictor()(images[:4]) for m in result.members], axis=0), atol=1e-6)


def test_calibration_bins_and_ece_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.05, 0.15, 0.95, 0.92, 0.55, 0.58])
    cal = calibration(labels, scores, n_bins=10)
    # bins: [0,.1): 0.05 -> freq 0; [.1,.2): .15 -> 0; [.5,.6): .55,.58 -> 0.5; [.9,1]: .95,.92 -> 1
    expected = (0.05 + 0.15 + 2 * abs(0.5 - 0.565) + 2 * abs(1 - 0.935)) / 6
    assert cal["ece"] == pytest.approx(expected)
    assert [b["n"] for b in cal["bins"]] == [1, 1, 2, 2]
    assert cal["mce"] == pytest.approx(0.15)
    assert calibration([1], [1.0])["bins"][0]["low"] == pytest.approx(0.9)  # 1.0 falls in the last bin
    perfect = calibration(np.r_[np.zeros(8), np.ones(2)], np.full(10, 0.2))
    assert perfect["ece"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="probabilities"):
        calibration([0, 1], [0.5, 1.5])
    with pytest.raises(ValueError, match="labels but"):
        calibration([0, 1], [0.5])


def test_with_calibration_covers_each_class_and_macro_f1() -> None:
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.4], [0.1, 0.3]])
    m = with_calibration(multilabel_metrics(labels, scores, ["a", "b"], 0.5), labels, scores)
    assert set(m["per_class"]) == {"a", "b"} and all("calibration" in c for c in m["per_class"].values())
    assert m["calibration"]["n"] == 8
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # a: 2 TP; b: 1 TP, 1 FN


def test_category_table_and_derived_good_bad() -> None:
    assert set(HSI100_TO_GORDON2020) == set(HSI100_CATEGORIES)
    assert set(HSI100_TO_GORDON2020.values()) == set(GORDON2020_CATEGORIES)
    six = np.array([[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(four_categories(six), [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]])
    p = np.array([[0.9, 0.1, 0.2, 0.5, 0.1, 0.3], [0.1, 0.1, 0.1, 0.9, 0.0, 0.0]])
    np.testing.assert_allclose(binary_from_multiclass(p), [0.9 * 0.7, 0.1])
    with pytest.raises(DataError, match="class probabilities"):
        binary_from_multiclass(np.zeros((2, 4)))


def _small_hsi_npz(path: Path, n: int = 48) -> Path:
    """An H:Si(100)-layout .npz of `n` random images; every image has clear votes (good, bad or rows)."""
    rng = np.random.default_rng(3)
    scores = np.zeros((n, 6), np.float32)
    scores[np.arange(n), rng.choice([0, 1, 2, 3, 4, 5], n)] = 1.0
    np.savez(path, images=rng.integers(0, 255, (n, 64, 64)).astype(np.uint8), scores=scores,
             n_responses=np.full(n, 2, np.int32), names=np.array([f"img{i}.png" for i in range(n)]),
             categories=np.array(HSI100_CATEGORIES), orig_shape=np.full((n, 2), 300))
    return path


def test_cli_ensemble_train_and_evaluate_with_plots(tmp_path: Path) -> None:
    from deepspm.cli import main

    data = _small_hsi_npz(tmp_path / "hsi.npz")
    out, plots, report = tmp_path / "ens", tmp_path / "plots", tmp_path / "eval.json"
    assert main(["train", "classifier", "--data", str(data), "--out", str(out), "--preset", "tiny", "--epochs", "1",
                 "--ensemble", "2", "--combine", "vote", "--holdout-fraction", "0.5", "--val-fraction", "0",
                 "--multiclass"]) == 0
    meta = json.loads((out / "meta" / "metadata").read_text())
    assert meta["ensemble"] == {"k": 2, "combine": "vote"}
    assert [m["seed"] for m in meta["metadata"]["ensemble"]["members"]] == [0, 1]
    assert main(["evaluate", "classifier", "--checkpoint", str(out), "--data", str(data), "--split",
                 str(out / "split.json"), "--plots", str(plots), "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())["metrics"]
    assert 0.0 <= metrics["calibration"]["ece"] <= 1.0 and "calibration" in metrics["per_class"]["Rows"]
    assert metrics["binary"]["metrics"]["n"] > 0 and "calibration" in metrics["binary"]["metrics"]
    assert set(metrics["four_categories"]["per_class"]) == set(GORDON2020_CATEGORIES)
    assert (plots / "reliability.png").stat().st_size > 1000


def test_cli_refuses_fine_tuning_from_an_ensemble(tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    from deepspm.cli import main

    net, members = three
    save_net(tmp_path / "ens", EnsembleDef.of_member(net, 3), stack_members(members), kind="classifier")
    data = _small_hsi_npz(tmp_path / "hsi.npz", 12)
    code = main(["train", "classifier", "--data", str(data), "--out", str(tmp_path / "ft"), "--init",
                 str(tmp_path / "ens"), "--multiclass", "--epochs", "1"])
    assert code == 2 and "single net" in capsys.readouterr().err
