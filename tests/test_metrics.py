"""Evaluation metrics: KID against torchmetrics, LPIPS pair protocols, FLD/GG behaviour, weights handling."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import blob_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geca.data.imageset import image_hashes
from geca.errors import DataError, MissingWeightsError
from geca.metrics import diversity, features
from geca.metrics.diversity import load_lpips, lpips_diversity, lpips_pairs
from geca.metrics.domain import TRAINED_ON, load_domain_net, save_domain_net, train_domain_net
from geca.metrics.features import DinoV2Features, build_extractor
from geca.metrics.fld import fld
from geca.metrics.kid import kid, kid_standard_error, kid_subset_size, poly_mmd2
from geca.utils.io import file_sha256 as sha256_of


def _images(n: int, size: int = 16, channels: int = 3, seed: int = 0, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, size, size, channels)) + shift, 0, 255).astype(np.uint8)


def test_kid_equals_torchmetrics_with_the_same_feature_module() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    extractor = build_extractor("random", seed=3)
    real, fake = _images(60, seed=1), _images(50, seed=2, shift=30)
    fr, ff = extractor.extract(real), extractor.extract(fake)
    for subset_size in (20, 50):  # random subsets, then every subset the whole generated set
        metric = KernelInceptionDistance(feature=extractor, subsets=15, subset_size=subset_size)
        metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
        metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
        torch.manual_seed(7)  # torchmetrics draws its subsets from the global generator
        tm_mean, tm_std = metric.compute()
        ours = kid(fr, ff, subset_size, subsets=15, seed=7)
        assert ours.mean == pytest.approx(tm_mean.item(), abs=1e-6)
        assert ours.std == pytest.approx(tm_std.item(), abs=1e-6)
        assert ours.mean > 0


def test_kid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same = kid(x, y, 60, subsets=50, seed=0)
    shifted = kid(x, y + 0.5, 60, subsets=50, seed=0)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 4 * shifted.std and shifted.mean > 20 * abs(same.mean)
    # Subsets of one set share images, which biases the unbiased estimator slightly negative; still ≈ 0.
    assert abs(kid(x, x, 60, subsets=50).mean) < 0.1 * shifted.mean
    assert kid(x, y, 60, subsets=5, seed=1) == kid(x, y, 60, subsets=5, seed=1)


def _mmd2_unequal(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of sets of different sizes, written out term by term (the oracle for the jackknife)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
            - 2 * kxy.mean()).item()


def test_kid_standard_error_is_the_delete_one_jackknife() -> None:
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(rng.normal(size=(30, 5))), torch.from_numpy(rng.normal(0.4, 1.0, size=(12, 5)))
    assert _mmd2_unequal(x[:12], y) == pytest.approx(poly_mmd2(x[:12], y).item(), rel=1e-9)
    left_out = np.array([_mmd2_unequal(x, torch.cat([y[:i], y[i + 1:]])) for i in range(12)])
    plain = math.sqrt(11 / 12 * ((left_out - left_out.mean()) ** 2).sum())
    assert kid_standard_error(x.numpy(), y.numpy(), block=5) == pytest.approx(plain, rel=1e-9)
    labels = np.eye(3)[[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]]  # one-hot rows; strata of 4, 3 and 5
    stratified = math.sqrt(sum((len(g) - 1) / len(g) * ((g - g.mean()) ** 2).sum()
                               for g in (left_out[:4], left_out[4:7], left_out[7:])))
    assert kid_standard_error(x.numpy(), y.numpy(), labels, block=5) == pytest.approx(stratified, rel=1e-9)
    lonely = np.eye(3)[[0] * 11 + [1]]  # a label with one image cannot be stratified: the plain jackknife
    assert kid_standard_error(x.numpy(), y.numpy(), lonely) == pytest.approx(plain, rel=1e-9)
    with pytest.raises(ValueError, match="3 generated"):
        kid_standard_error(x.numpy(), y[:2].numpy())


def test_kid_standard_error_matches_the_spread_over_fresh_generated_sets() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 8))
    labels = np.repeat([0, 1], 50)
    centres = (labels[:, None] == 1) * np.eye(8)[0] * 3.0  # class 0 as the real images, class 1 far off

    def draw() -> np.ndarray:  # fresh images for the same labels
        return centres + rng.normal(size=(100, 8))

    draws = [draw() for _ in range(200)]
    spread = np.std([_mmd2_unequal(torch.from_numpy(real), torch.from_numpy(y)) for y in draws])
    stratified = np.mean([kid_standard_error(real, y, labels) for y in draws[:40]])
    assert 0.75 < stratified / spread < 1.33
    # Ignoring the labels counts the classes' share as random too: larger than the spread with the labels fixed.
    assert np.mean([kid_standard_error(real, y) for y in draws[:40]]) > 1.25 * spread
    # KID's ± over subsets cannot see it once each subset is the whole generated set: that spread is the real side's.
    assert kid(real, draws[0], 100, subsets=50).std < 0.8 * spread


def test_kid_protocol_subset_sizes_and_bad_input() -> None:
    assert kid_subset_size("paper", 400, 1000) == 250
    assert kid_subset_size("paper", 100, 1000) == 100  # never more than the real set holds
    assert kid_subset_size("standard", 400, 1000) == 400
    assert kid_subset_size("standard", 5000, 3000) == 1000
    with pytest.raises(ValueError, match="protocol"):
        kid_subset_size("fid", 10, 10)
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="subset size"):
        kid(x, x, 11)
    with pytest.raises(ValueError, match="NaN"):
        kid(x, np.full((10, 4), np.nan), 5)


def test_lpips_pair_protocols() -> None:
    paper = lpips_pairs(10, "paper", seed=0)
    assert paper.shape == (9, 2)
    assert np.array_equal(paper[1:, 0], paper[:-1, 1])  # consecutive pairs of one shuffle
    assert sorted({*paper[:, 0], paper[-1, 1]}) == list(range(10))
    assert not np.array_equal(paper, lpips_pairs(10, "paper", seed=1))
    standard = lpips_pairs(100, "standard", seed=0)
    assert standard.shape == (2000, 2)
    assert np.all(standard[:, 0] < standard[:, 1]) and standard.max() < 100
    assert len({tuple(p) for p in standard}) == 2000
    assert np.array_equal(standard, lpips_pairs(100, "standard", seed=0))
    assert len(lpips_pairs(30, "standard")) == 30 * 29 // 2  # fewer possible pairs than 2,000: all of them
    with pytest.raises(ValueError, match="at least 2"):
        lpips_pairs(1, "paper")


def test_lpips_diversity_with_a_random_backbone() -> None:
    model = load_lpips("random", seed=0)
    grey = _images(12, size=28, channels=1)
    res = lpips_diversity(grey, model, "paper", seed=0)
    assert res.pairs == 11 and res.mean > 0 and res.std > 0
    same = lpips_diversity(np.repeat(grey[:1], 5, axis=0), model, "standard")
    assert same.pairs == 10 and same.mean == pytest.approx(0.0, abs=1e-6)


def test_lpips_loads_torchvision_alexnet_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(DataError, match="not that of the published torchvision AlexNet"):
        load_lpips(tmp_path / "alexnet-owt-7be5be79.pth")  # random weights under the published name
    monkeypatch.setattr(diversity, "ALEXNET_SHA256", sha256_of(tmp_path / "alexnet-owt-7be5be79.pth")[:8])
    model = load_lpips(tmp_path / "alexnet-owt-7be5be79.pth")
    loaded = model.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], state["features.10.bias"])
    monkeypatch.setenv("GECA_WEIGHTS_DIR", str(tmp_path))
    assert torch.equal(load_lpips(None).net.state_dict()["slice3.6.weight"], state["features.6.weight"])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.pth"):
        load_lpips(bad)


def test_weights_are_found_in_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torchvision would have put AlexNet: found without a flag or $GECA_WEIGHTS_DIR."""
    from geca.metrics.diversity import alexnet_weights

    monkeypatch.delenv("GECA_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(MissingWeightsError, match=str(cached)):
        alexnet_weights(None)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder")
    assert alexnet_weights(None) == cached


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GECA_WEIGHTS_DIR", raising=False)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth.*download.pytorch.org"):
        load_lpips(None)
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        build_extractor("inception")
    monkeypatch.setenv("GECA_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=f"looked for {tmp_path}/dinov2_vitb14_pretrain.pth, .*hub"):
        build_extractor("dinov2")
    with pytest.raises(DataError, match="geca features train"):
        build_extractor("domain", tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown features"):
        build_extractor("clip")


def test_inception_features_from_a_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    # A random-weights file of the right layout: build the network once with loading switched off.
    with monkeypatch.context() as m:
        m.setattr(tf, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    with pytest.raises(DataError, match="inception.pth: SHA-256 .* not that of the published Inception"):
        build_extractor("inception", tmp_path / "inception.pth")
    monkeypatch.setenv("GECA_UNVERIFIED_WEIGHTS", "1")
    with pytest.warns(UserWarning, match="not that of the published"):
        build_extractor("inception", tmp_path / "inception.pth")
    monkeypatch.delenv("GECA_UNVERIFIED_WEIGHTS")
    monkeypatch.setattr(features, "INCEPTION_SHA256", sha256_of(tmp_path / "inception.pth")[:8])
    ex = build_extractor("inception", tmp_path / "inception.pth")
    feats = ex.extract(_images(2, size=28, channels=1))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    ref = net(torch.from_numpy(_images(2, size=28, channels=1)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))[0]
    np.testing.assert_allclose(feats, ref.double().numpy(), rtol=1e-5, atol=1e-6)


class _RunsCode:
    """A pickle that runs code when unpickled: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_crafted_weights_file_never_runs_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCode(marker)}, crafted)
    monkeypatch.setenv("GECA_WEIGHTS_DIR", str(tmp_path))
    # Refused on its hash before anything reads it ...
    with pytest.raises(DataError, match="not that of the published Inception"):
        build_extractor("inception")
    # ... and, were its hash to match, read without unpickling code: torch's weights-only loader refuses it.
    monkeypatch.setattr(features, "INCEPTION_SHA256", sha256_of(crafted)[:8])
    with pytest.raises(DataError, match="not a readable Inception-v3 .FID. weights file"):
        build_extractor("inception")
    monkeypatch.setattr(diversity, "ALEXNET_SHA256", sha256_of(crafted)[:8])
    for make in (lambda p: DinoV2Features(p, arch="vit_small_patch14_dinov2"), load_lpips):
        with pytest.raises(DataError, match="not a readable"):
            make(crafted)
    assert not marker.exists()


def test_dinov2_features_load_a_meta_format_weights_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    # ViT-S/14 stands in for ViT-B/14 to keep the test small; the loading path is the same. Meta's files hold
    # a mask token and positional embeddings for 518 px, which timm converts and resamples to 224 px on load.
    net = timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0)
    torch.save({**net.state_dict(), "mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2.pth")
    ex = DinoV2Features(tmp_path / "dinov2.pth", arch="vit_small_patch14_dinov2")
    feats = ex.extract(_images(2, size=28, channels=1))
    assert feats.shape == (2, 384) and np.isfinite(feats).all()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pth"):
        DinoV2Features(tmp_path / "junk.pth", arch="vit_small_patch14_dinov2")


def test_fld_flags_memorisation_and_accepts_fresh_samples() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(150, 8)), rng.normal(size=(150, 8))
    copies = fld(train, test, train[:100])
    fresh = fld(train, test, rng.normal(size=(100, 8)))
    shifted = fld(train, test, rng.normal(size=(100, 8)) + 1.0)
    assert copies.gg < -1000 and copies.fld > 1000
    assert abs(fresh.gg) < 15 and abs(fresh.fld) < 10
    assert shifted.fld > 15 + fresh.fld
    assert fresh.components == 100
    assert fld(train, test, train[:100]) == copies  # deterministic under a seed
    # but not a number to rank by: noise of 1e-7 on the copies (another batch size) moves it by a factor of two
    nudged = fld(train, test, train[:100] + 1e-7 * rng.normal(size=(100, 8)))
    assert copies.fld > 2 * nudged.fld > 2e10 and copies.gg < 2 * nudged.gg < -2e10
    with pytest.raises(ValueError, match="widths differ"):
        fld(train, test, rng.normal(size=(10, 4)))


def test_domain_network_trains_saves_and_reloads(tmp_path: Path) -> None:
    from conftest import blob_images

    data = blob_images(n=32, size=12, channels=1)
    net = train_domain_net(data, seed=0, epochs=4, val=blob_images(n=16, size=12, channels=1, seed=5))
    again = train_domain_net(data, seed=0, epochs=4)
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    save_domain_net(net, tmp_path / "domain.safetensors")
    loaded = load_domain_net(tmp_path / "domain.safetensors")
    assert loaded.meta.class_names == data.class_names and loaded.meta.val_accuracy is not None
    assert np.array_equal(loaded.trained_on, image_hashes(data.images)) and len(set(loaded.trained_on)) == 32
    assert not np.isin(image_hashes(data.images[:, ::-1]), loaded.trained_on).any()  # a flipped image is another
    tensors = load_file(tmp_path / "domain.safetensors")
    save_file({**tensors, TRAINED_ON: tensors[TRAINED_ON].float()}, tmp_path / "odd.safetensors",
              metadata={"geca_domain": safe_open(str(tmp_path / "domain.safetensors"), "pt").metadata()["geca_domain"]})
    with pytest.raises(DataError, match="must be a 1-D int64 tensor"):
        load_domain_net(tmp_path / "odd.safetensors")
    meta = json.loads(safe_open(str(tmp_path / "domain.safetensors"), "pt").metadata()["geca_domain"])
    for change, why in (({"in_channels": "x"}, "in_channels: expected int"), ({"width": -1}, "width -1 out of range"),
                        ({"input_size": "abc"}, "input_size: expected int"), ({"num_classes": None}, "num_classes"),
                        ({"width": 10**6}, "width 1000000 out of range"), ({"bogus": 1}, "unknown key(s) bogus"),
                        ({"class_names": ["a"]}, "class_names out of range")):
        save_file(tensors, tmp_path / "bad.safetensors", metadata={"geca_domain": json.dumps({**meta, **change})})
        with pytest.raises(DataError, match=re.escape("bad.safetensors: corrupt geca_domain metadata")) as e:
            load_domain_net(tmp_path / "bad.safetensors")
        assert why in str(e.value)
    nan = {k: v.clone() for k, v in tensors.items()}
    nan["head.weight"][0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors", metadata={"geca_domain": json.dumps(meta)})
    with pytest.raises(DataError, match=r"nan.safetensors: weights hold NaN or inf \(head.weight\)"):
        load_domain_net(tmp_path / "nan.safetensors")
    ex = build_extractor("domain", tmp_path / "domain.safetensors")
    feats = ex.extract(data.images)
    assert feats.shape == (32, 128)
    with pytest.raises(DataError, match="1-channel"):
        ex.extract(_images(2, size=12, channels=3))


def _fixed_features(n: int, a: float, b: float, c: float) -> torch.Tensor:
    """Deterministic (n, 6) features (no random generator, so the expected numbers below never drift)."""
    rows = [[math.sin(a * i + b * j) * (1 + 0.2 * (j % 3)) + c * math.cos(0.5 * i * j) for j in range(6)]
            for i in range(n)]
    return torch.tensor(rows, dtype=torch.float32).double()


def test_fld_matches_the_reference_algorithm_on_fixed_features() -> None:
    """Expected values computed with marcojira/fld's MoG (early stop, log σ² clamped to [−40, 40]) on these
    features: 29 epochs and NLLs 0.99770737 (train) / 1.80847597 (test) for the generated mixture; 18 epochs and a
    test NLL of 2.09064102 for the baseline mixture on train[:60] fitted to train[60:]."""
    from geca.metrics.fld import IsotropicMixture

    train, test = _fixed_features(120, 0.37, 1.1, 0.3), _fixed_features(90, 0.53, 0.7, 0.2)
    gen = torch.cat([train[:20] + 0.01 * _fixed_features(20, 1.7, 0.3, 0.0), _fixed_features(40, 0.91, 1.9, 0.4)])
    res = fld(train, test, gen)
    assert res.nll_train == pytest.approx(0.99770737, abs=3e-5)
    assert res.nll_test == pytest.approx(1.80847597, abs=3e-5)
    assert res.gg == pytest.approx(100 * (0.99770737 - 1.80847597), abs=5e-3)
    mean, std = test.mean(0), test.std(0)
    tr, te, ge = (train - mean) / std, (test - mean) / std, (gen - mean) / std
    assert len(IsotropicMixture(ge).fit(tr, torch.Generator().manual_seed(0))) == 29
    base = IsotropicMixture(tr[:60])
    assert len(base.fit(tr[60:], torch.Generator().manual_seed(0))) == 18
    assert base.nll(te).mean().item() == pytest.approx(2.09064102, abs=3e-5)


def test_the_cached_domain_network_is_keyed_on_data_seed_and_device() -> None:
    from geca.metrics.domain import data_digest

    data = blob_images(n=8, size=8)
    key = data_digest(data, 0)
    assert key == data_digest(blob_images(n=8, size=8), 0, "cpu")
    other = blob_images(n=8, seed=3, size=8)
    assert len({key, data_digest(data, 1), data_digest(data, 0, "cuda"), data_digest(other, 0)}) == 4
    # the same one-hot rows as multi-label data (evaluate --multilabel) train and judge another network; multi-hot
    # data keeps the key it always had
    assert data_digest(replace(data, multilabel=True), 0) != key
    hot = replace(data, labels=data.labels.copy(), multilabel=True)
    hot.labels[0] = 1
    assert data_digest(hot, 0) == data_digest(replace(hot, multilabel=False), 0)
