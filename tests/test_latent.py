"""Latent diffusion through a tiny, randomly initialised AutoencoderKL: codec, cache, training and sampling."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import blob_images, tiny_model_config
from diffusers import AutoencoderKL
from PIL import Image
from typer.testing import CliRunner

from geca.cli.encode import encode
from geca.cli.main import app
from geca.config import RunConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import LatentError
from geca.latent.cache import ensure_latents
from geca.latent.codec import LatentCodec
from geca.training.trainer import train

runner = CliRunner()
encode_app = typer.Typer()
encode_app.command()(encode)


def make_vae(path: Path, seed: int = 0, **config: object) -> Path:
    """A 2-block AutoencoderKL (downsampling ×2, 4 latent channels) saved the way diffusers saves real ones."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32, **config)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def random_images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@torch.no_grad()
def posterior(vae: AutoencoderKL, images: np.ndarray) -> object:
    """The VAE's own latent_dist of uint8 images (already at the VAE's size) mapped to [-1, 1]."""
    return vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1).latent_dist


def test_codec_shapes_scaling_and_round_trip(tiny_vae: Path) -> None:
    codec = LatentCodec.load(str(tiny_vae), size=32)
    images = random_images(3, 32, 32)
    sampled = codec.encode(images)
    assert sampled.shape == (3, 4, 16, 16) and codec.latent_shape == (4, 16, 16) and codec.scale == 0.18215
    means = codec.encode(images, mean=True)
    direct = posterior(codec.vae, images)
    assert torch.equal(means, direct.mean * 0.18215)
    # samples are mean + std·ε, with ε drawn per image: batch size does not change them
    assert not torch.allclose(sampled, means)
    assert ((sampled - means) / 0.18215 / direct.std).std() == pytest.approx(1.0, abs=0.1)
    one_by_one = LatentCodec(codec.vae, size=32, batch_size=1).encode(images)
    assert torch.allclose(one_by_one, sampled, atol=1e-5)
    decoded = codec.decode(sampled)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 32, 32, 3)
    assert codec.decode(sampled, channels=1).shape == (3, 32, 32, 1)
    # non-square images are centre-cropped, then resized to the codec's size; grey ones go in as RGB
    assert codec.encode(random_images(2, 40, 48), mean=True).shape == (2, 4, 16, 16)
    grey = random_images(2, 32, 32, c=1)
    assert torch.equal(codec.encode(grey, mean=True), codec.encode(np.repeat(grey, 3, axis=-1), mean=True))


def test_scale_comes_from_the_vae_config(tmp_path: Path) -> None:
    codec = LatentCodec.load(str(make_vae(tmp_path / "vae", scaling_factor=0.5)), size=32)
    images = random_images(2, 32, 32)
    direct = posterior(codec.vae, images)
    assert codec.scale == 0.5 and torch.equal(codec.encode(images, mean=True), direct.mean * 0.5)


def test_size_must_fit_the_vae_downsampling(tiny_vae: Path) -> None:
    with pytest.raises(LatentError, match="multiple of the VAE's downsampling factor 2"):
        LatentCodec.load(str(tiny_vae), size=31)


def test_flipped_latents_are_encodings_of_flipped_images(tiny_vae: Path, tmp_path: Path) -> None:
    codec = LatentCodec.load(str(tiny_vae), size=8)
    data = blob_images(n=4, size=8)
    mirrored = np.ascontiguousarray(data.images[:, :, ::-1])
    assert torch.equal(codec.encode(data.images, mean=True, flip=True), codec.encode(mirrored, mean=True))
    cached, _ = ensure_latents(str(tiny_vae), data, "train", tmp_path, size=8, mean=True, get_codec=lambda: codec)
    assert torch.equal(cached.flipped, codec.encode(mirrored, mean=True))
    assert not torch.allclose(cached.flipped, cached.latents.flip(-1))  # why the cache holds both


def test_cache_is_reused_when_unchanged_and_rebuilt_when_anything_changes(tmp_path: Path) -> None:
    vae = make_vae(tmp_path / "vae")
    cache = tmp_path / "cache"
    loads = []

    def ensure(data: object, size: int = 8, mean: bool = False) -> tuple[torch.Tensor, str]:
        def get_codec() -> LatentCodec:
            loads.append(1)
            return LatentCodec.load(str(vae), size=size)

        latents, status = ensure_latents(str(vae), data, "train", cache, size=size, mean=mean, get_codec=get_codec)
        return latents.latents, status

    data = blob_images(n=4, size=8)
    first, status = ensure(data)
    assert status == "built" and first.shape == (4, 4, 4, 4)
    again, status = ensure(data)
    assert status == "reused" and torch.equal(again, first) and len(loads) == 1  # no VAE loaded to reuse
    assert ensure(data, size=16)[1] == "rebuilt (changed: size)"
    assert ensure(data, size=16, mean=True)[1] == "rebuilt (changed: mode)"
    assert ensure(blob_images(n=4, size=8, seed=1), size=16, mean=True)[1] == "rebuilt (changed: data)"
    make_vae(vae, seed=1)  # same config, new weights
    assert ensure(blob_images(n=4, size=8, seed=1), size=16, mean=True)[1] == "rebuilt (changed: vae)"
    (cache / "train/meta.json").write_text("{not json")
    assert ensure(blob_images(n=4, size=8, seed=1), size=16, mean=True)[1].startswith("rebuilt (unreadable")
    assert sorted(p.name for p in cache.iterdir()) == ["train"]  # no partial directories left behind
    meta = json.loads((cache / "train/meta.json").read_text())
    assert meta["latent_spec"]["vae"] == str(vae.resolve()) and meta["components"]["size"] == 16


def test_missing_vae_fails_fast_naming_it(tmp_path: Path, blobs_npz: Path) -> None:
    missing = tmp_path / "no-such-vae"
    with pytest.raises(LatentError, match="huggingface-cli download stabilityai/sd-vae-ft-ema") as info:
        LatentCodec.load(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(LatentError, match="'nobody/no-such-vae' not found.*local Hugging Face cache"):
        LatentCodec.load("nobody/no-such-vae")
    res = runner.invoke(encode_app, ["--vae", str(missing), "--data", str(blobs_npz), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "error:" in res.output and str(missing) in res.output
    res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(tmp_path / "run"), "--vae",
                              str(missing), "--model", "GeCA-T", "--max-steps", "1", "--no-progress"])
    assert res.exit_code == 2 and str(missing) in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LatentError, match="config.json not found"):
        LatentCodec.load(str(empty))
    for damaged, why in ((b"\xff\xfe", "corrupt, not JSON"), (b"[]", "corrupt, a JSON list")):
        (empty / "config.json").write_bytes(damaged)
        with pytest.raises(LatentError, match=f"config.json: {why}"):
            LatentCodec.load(str(empty))


def test_encode_command_caches_every_split_and_reuses_it(tiny_vae: Path, blobs_npz: Path, tmp_path: Path) -> None:
    args = ["--vae", str(tiny_vae), "--data", str(blobs_npz), "--out", str(tmp_path / "cache"), "--size", "8",
            "--no-progress"]
    res = runner.invoke(encode_app, args)
    assert res.exit_code == 0, res.output
    assert [line.split(":")[:2] for line in res.output.splitlines()] == [[s, " built"] for s in ("train", "val",
                                                                                               "test")]
    assert "8 latents of 4×4×4" in res.output
    res = runner.invoke(encode_app, [*args, "--mean", "--splits", "val"])
    assert res.output.startswith("val: rebuilt (changed: mode)"), res.output
    (tmp_path / "cache" / "train" / ".DS_Store").write_bytes(b"")  # a hidden file is no other's folder
    res = runner.invoke(encode_app, [*args, "--splits", "train"])
    assert res.output.startswith("train: reused"), res.output
    (tmp_path / "cache" / "train" / "notes.txt").write_text("mine")  # a usable cache is reused as it is
    res = runner.invoke(encode_app, [*args, "--splits", "train"])
    assert res.output.startswith("train: reused"), res.output
    res = runner.invoke(encode_app, [*args, "--mean", "--splits", "train"])  # not rebuilt over notes.txt
    assert res.exit_code == 2 and "train: holds other files (notes.txt)" in res.output, res.output
    photo = tmp_path / "cache" / "test" / "photo.png"  # a cache folder is replaced whole when rebuilt
    photo.write_bytes(b"mine")
    val_meta = (tmp_path / "cache" / "val" / "meta.json").read_bytes()
    res = runner.invoke(encode_app, [*args, "--splits", "val,test", "--size", "16"])  # both would be rebuilt
    assert res.exit_code == 2 and "test: holds other files (photo.png)" in res.output, res.output
    assert photo.read_bytes() == b"mine" and "val:" not in res.output  # refused before val was encoded
    assert (tmp_path / "cache" / "val" / "meta.json").read_bytes() == val_meta


def test_encode_holds_one_split_in_memory_at_a_time(tiny_vae: Path, blobs_npz: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import geca.data.registry as registry

    original, alive = registry.load_split, []

    def spy(*args: object, **kwargs: object) -> object:
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        images = original(*args, **kwargs)
        loaded.append(weakref.ref(images))
        return images

    loaded: list[weakref.ref] = []
    monkeypatch.setattr(registry, "load_split", spy)
    args = ["--vae", str(tiny_vae), "--data", str(blobs_npz), "--out", str(tmp_path / "cache"), "--size", "8",
            "--no-progress"]
    assert runner.invoke(encode_app, args).exit_code == 0
    assert len(alive) == 6 and max(alive) == 0  # each split loaded to check its cache, then again to encode it
    alive.clear()
    res = runner.invoke(encode_app, args)
    assert res.output.count(": reused:") == 3 and len(alive) == 3 and max(alive) == 0


def test_training_picks_the_cached_flipped_latent(tiny_vae: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = GaussianDiffusion.training_losses

    def spy(self: GaussianDiffusion, fn: object, x0: torch.Tensor, *args: object) -> dict[str, torch.Tensor]:
        seen.append(x0.detach().clone())
        return original(self, fn, x0, *args)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    cfg = RunConfig()
    cfg.model = tiny_model_config(nca_steps=1)
    cfg.data.vae, cfg.data.latent_size, cfg.data.spec = str(tiny_vae), 8, "blobs"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.sample_every, cfg.train.checkpoint_every = 3, 8, 0, 0
    train(cfg, tmp_path / "run", train_set=blob_images(n=8, size=8), progress=False)
    codec = LatentCodec.load(str(tiny_vae), size=8)
    cached, status = ensure_latents(str(tiny_vae), blob_images(n=8, size=8), "train", tmp_path / "run/latents",
                                    size=8, get_codec=lambda: codec)
    assert status == "reused"
    rows = torch.cat(seen)
    plain = [any(torch.equal(r, c) for c in cached.latents) for r in rows]
    mirrored = [any(torch.equal(r, c) for c in cached.flipped) for r in rows]
    assert all(p or m for p, m in zip(plain, mirrored, strict=True))
    assert any(plain) and any(mirrored)


def test_train_and_sample_through_a_vae_write_decoded_images(blobs_npz: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_vae = make_vae(tmp_path / "vae")  # its own: this test replaces the weights at the end
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", str(blobs_npz), "--out", str(run), "--vae", str(tiny_vae),
                              "--latent-size", "8", "--model", "GeCA-T", "--nca-steps", "1", "--max-steps", "2",
                              "--batch-size", "4", "--sample-every", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "latents of the training images: built" in res.output
    spec = json.loads((run / "model.json").read_text())
    assert (spec["in_channels"], spec["resolution"]) == (4, 4)
    assert spec["latent"]["image_size"] == 8 and spec["latent"]["scale"] == 0.18215
    preview = np.array(Image.open(run / "samples/step_0000002.png"))
    assert preview.ndim == 3 and preview.shape[-1] == 3
    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--run", str(run), "--out", str(out), "--per-class", "1", "--sampler",
                              "ddim", "--steps", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (8, 8) and Image.open(p).mode == "RGB" for p in pngs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["clip_x0"] is False and manifest["latent"]["vae"] == str(tiny_vae.resolve())
    # a VAE moved since training: sampling, expansion and resumed training are told where it is now
    moved = tmp_path / "vae-moved"
    shutil.move(tiny_vae, moved)
    res = runner.invoke(app, ["sample", "--run", str(run), "--out", str(tmp_path / "s1"), "--per-class", "1",
                              "--sampler", "ddim", "--steps", "2", "--no-progress"])
    assert res.exit_code == 2 and "not found" in res.output and "pass --vae DIR" in res.output
    monkeypatch.chdir(tmp_path)  # a relative --vae is recorded absolute, as training records it
    res = runner.invoke(app, ["sample", "--run", str(run), "--out", str(tmp_path / "s1"), "--per-class", "1",
                              "--sampler", "ddim", "--steps", "2", "--no-progress", "--vae", moved.name])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s1" / "manifest.json").read_text())["latent"]["vae"] == str(moved.resolve())
    assert all(np.array_equal(np.array(Image.open(a)), np.array(Image.open(b)))
               for a, b in zip(pngs, sorted((tmp_path / "s1" / "images").glob("*.png")), strict=True))
    res = runner.invoke(app, ["train", "--out", str(run), "--resume", "--vae", str(moved), "--max-steps", "3",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "model.json").read_text())["latent"]["vae"] == str(moved.resolve())
    # sampling with a VAE whose weights changed since training is refused (its latents would decode to noise)
    shutil.rmtree(moved)
    make_vae(moved, seed=7)
    res = runner.invoke(app, ["sample", "--run", str(run), "--out", str(tmp_path / "s2"), "--per-class", "1",
                              "--sampler", "ddim", "--steps", "2", "--no-progress"])
    assert res.exit_code == 2 and "differ from those the run was trained with" in res.output


def test_a_bin_vae_loads_as_plain_tensors_without_diffusers_warning(tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    import pickle

    from geca.errors import DataError
    from geca.latent.vae import load_vae

    safe = make_vae(tmp_path / "safe")
    root = make_vae(tmp_path / "bin")
    (root / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(load_vae(safe).state_dict(), root / "diffusion_pytorch_model.bin")
    capfd.readouterr()
    vae = load_vae(root)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), load_vae(safe).state_dict().values(),
                                                 strict=True))
    assert "unsafe" not in "".join(capfd.readouterr())
    marker = tmp_path / "pwned"

    class Touch:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (root / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"encoder.conv_in.weight": Touch()}))
    with pytest.raises(DataError, match="diffusion_pytorch_model.bin: not a readable VAE weights file .*holds objects "
                       "other than tensors"):
        load_vae(root)
    assert not marker.exists()


def test_the_codec_preprocesses_as_its_cache_key_says() -> None:
    """Cached latents are keyed by PREPROCESS, not by the code: the crop and resize must stay torchvision's on uint8
    (half pixels of the crop rounded to even), or caches written before would pass for new ones."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from geca.utils.images import fit_square

    rng = np.random.default_rng(0)
    for h, w, size in [(28, 28, 64), (40, 51, 28), (51, 40, 16), (33, 47, 33)]:
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        x = TF.center_crop(torch.from_numpy(images).permute(0, 3, 1, 2), [min(h, w)] * 2)
        if min(h, w) != size:
            x = TF.resize(x, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        assert np.array_equal(fit_square(images, size), x.permute(0, 2, 3, 1).numpy())
