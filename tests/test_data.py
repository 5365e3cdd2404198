"""Loaders on small real-layout files written here, the synthetic generator, transforms, collate."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from adapmtl.data import BGR_MEAN, DatasetError, NYUv2, Taskonomy, collate_multitask, make_synthetic_scenes
from adapmtl.data import transforms as T
from adapmtl.data.nyuv2 import decode_normal, encode_normal
from adapmtl.tasks import NYUV2_TASKS


def _write_nyu(root, n_train=3, n_test=2, hw=(12, 16), seed=0):
    rng = np.random.default_rng(seed)
    h, w = hw
    meta = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            names = [f"rgb/{split}{i}.png", f"seg/{split}{i}.png", f"nrm/{split}{i}.png", f"dep/{split}{i}.npy"]
            for sub in ("rgb", "seg", "nrm", "dep"):
                os.makedirs(root / sub, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / names[0])
            seg = rng.integers(0, 40, (h, w)).astype(np.uint8)
            seg[0, :3] = 255
            Image.fromarray(seg).save(root / names[1])
            nrm = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            nrm[1, 1] = (10, 255, 10)
            Image.fromarray(nrm).save(root / names[2])
            dep = rng.uniform(0.5, 8, (h, w)).astype(np.float32)
            dep[2, 2] = 0.0
            dep[3, 3] = 1e-5
            np.save(root / names[3], dep)
            meta[split].append(names)
    (root / "nyu_v2_3task.json").write_text(json.dumps(meta))
    return meta


def test_nyuv2_decoding_exact(tmp_path):
    meta = _write_nyu(tmp_path)
    ds = NYUv2(tmp_path, "test", crop_size=(12, 16))
    s = ds[0]
    rgb = np.asarray(Image.open(tmp_path / meta["test"][0][0]))
    # BGR minus mean, no /255
    expect = torch.from_numpy(rgb[:, :, ::-1].astype(np.float32).copy()).permute(2, 0, 1) - torch.tensor(BGR_MEAN).view(3, 1, 1)
    torch.testing.assert_close(s["image"], expect)
    seg = np.asarray(Image.open(tmp_path / meta["test"][0][1]))
    assert s["segment_semantic"].dtype == torch.int64 and torch.equal(s["segment_semantic"], torch.from_numpy(seg.astype(np.int64)))
    assert s["segment_semantic"][0, :3].tolist() == [255] * 3
    nrm = np.asarray(Image.open(tmp_path / meta["test"][0][2])).astype(np.float32)
    assert not s["normal_mask"][1, 1] and s["normal_mask"].sum() == 12 * 16 - 1
    torch.testing.assert_close(s["normal"][:, 5, 5], torch.from_numpy(nrm[5, 5] / 255 * 2 - 1))
    assert not s["depth_mask"][2, 2] and not s["depth_mask"][3, 3] and s["depth_mask"][4, 4]
    assert s["depth"].shape == (1, 12, 16) and s["depth"].dtype == torch.float32
    assert s["depth"][0, 3, 3] == 0


def test_nyuv2_test_resize_nearest_labels(tmp_path):
    _write_nyu(tmp_path)
    s = NYUv2(tmp_path, "test", crop_size=25)[1]
    assert s["image"].shape == (3, 25, 25) and s["segment_semantic"].shape == (25, 25)
    assert set(s["segment_semantic"].unique().tolist()) <= set(range(40)) | {255}  # no blended labels
    assert s["normal_mask"].dtype == torch.bool and s["depth_mask"].shape == (25, 25)


def test_nyuv2_train_augmentation(tmp_path):
    _write_nyu(tmp_path, n_train=4)
    ds = NYUv2(tmp_path, "train", crop_size=(20, 30), val_fraction=0.0)
    assert len(ds) == 4 and ds.augment
    torch.manual_seed(0)
    for i in range(4):
        s = ds[i]
        assert s["image"].shape == (3, 20, 30) and s["segment_semantic"].shape == (20, 30)
        pad = s["image"].abs().sum(0) == 0  # padding: image 0 (the mean), labels ignored
        assert torch.all(s["segment_semantic"][pad] == 255) and not s["depth_mask"][pad].any()
        assert not s["normal_mask"][pad].any()
        assert s["segment_semantic"][~pad].numel() == 0 or s["segment_semantic"][~pad].max() <= 255


def test_hflip_negates_normal_x():
    s = {"image": torch.randn(3, 4, 5), "normal": torch.randn(3, 4, 5), "segment_semantic": torch.randint(0, 40, (4, 5))}
    f = T.hflip(s)
    torch.testing.assert_close(f["normal"][0], -s["normal"][0].flip(-1))
    torch.testing.assert_close(f["normal"][1:], s["normal"][1:].flip(-1))
    torch.testing.assert_close(f["segment_semantic"], s["segment_semantic"].flip(-1))


def test_random_crop_pad_keeps_alignment():
    specs = {t.name: t for t in NYUV2_TASKS}
    img = torch.arange(7 * 9, dtype=torch.float32).view(1, 7, 9).repeat(3, 1, 1) + 1
    s = {"image": img, "segment_semantic": img[0].long(), "depth": img[:1].clone(), "depth_mask": torch.ones(7, 9, dtype=torch.bool)}
    torch.manual_seed(3)
    for _ in range(5):
        c = T.random_crop_pad(s, (10, 6), specs)
        keep = c["image"][0] != 0
        torch.testing.assert_close(c["image"][0][keep].long(), c["segment_semantic"][keep])
        assert torch.all(c["segment_semantic"][~keep] == 255) and torch.equal(c["depth_mask"], keep)


def test_val_split_is_deterministic_and_disjoint(tmp_path):
    _write_nyu(tmp_path, n_train=10, n_test=1)
    tr = NYUv2(tmp_path, "train", val_fraction=0.3, seed=1)
    va = NYUv2(tmp_path, "val", val_fraction=0.3, seed=1)
    assert len(tr) == 7 and len(va) == 3 and not va.augment
    assert not {e[0] for e in tr.entries} & {e[0] for e in va.entries}
    assert [e[0] for e in NYUv2(tmp_path, "val", val_fraction=0.3, seed=1).entries] == [e[0] for e in va.entries]
    with pytest.raises(DatasetError, match="empty"):
        NYUv2(tmp_path, "val", val_fraction=0.0)


def test_nyuv2_errors_name_file_and_root(tmp_path):
    meta = _write_nyu(tmp_path)
    os.remove(tmp_path / meta["test"][1][3])
    with pytest.raises(DatasetError, match="1 file") as e:  # the whole index is checked up front
        NYUv2(tmp_path, "test")
    assert meta["test"][1][3] in str(e.value) and str(tmp_path) in str(e.value)
    ds = NYUv2(tmp_path, "test", check_files=False)
    with pytest.raises(DatasetError) as e:
        ds[1]
    assert meta["test"][1][3] in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / meta["test"][0][1]).write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image") as e:
        ds[0]
    assert meta["test"][0][1] in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "nyu_v2_3task.json").write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(DatasetError, match="empty"):
        NYUv2(tmp_path, "test")
    with pytest.raises(DatasetError, match="nyu_v2_3task.json"):
        NYUv2(tmp_path / "rgb", "test")
    with pytest.raises(ValueError, match="split"):
        NYUv2(tmp_path, "dev")


def test_nyuv2_rejects_out_of_range_labels(tmp_path):
    meta = _write_nyu(tmp_path, n_test=1)
    Image.fromarray(np.full((12, 16), 41, np.uint8)).save(tmp_path / meta["test"][0][1])
    with pytest.raises(DatasetError, match="0..39"):
        NYUv2(tmp_path, "test")[0]


def _write_taskonomy(root, n=3, hw=(10, 14)):
    rng = np.random.default_rng(0)
    meta = {"train": [], "test": []}
    for split in ("train", "test"):
        for i in range(n):
            names = [f"{t}/{split}{i}.png" for t in ("rgb", "seg", "nrm", "dep", "kp", "edge")]
            for nm in names:
                os.makedirs(root / os.path.dirname(nm), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / names[0])
            Image.fromarray(rng.integers(0, 18, hw).astype(np.uint8)).save(root / names[1])
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / names[2])
            dep = rng.integers(0, 65536, hw).astype(np.uint16)
            dep[0, 0] = 65535
            dep[0, 1] = 100
            Image.fromarray(dep).save(root / names[3])
            Image.fromarray(rng.integers(0, 65536, hw).astype(np.uint16)).save(root / names[4])
            Image.fromarray(rng.integers(0, 65536, hw).astype(np.uint16)).save(root / names[5])
            meta[split].append(names)
    (root / "taskonomy.json").write_text(json.dumps(meta))
    np.save(root / "semseg_prior_factor.npy", np.linspace(0.5, 2, 17).astype(np.float32))
    return meta


def test_taskonomy_decoding(tmp_path):
    meta = _write_taskonomy(tmp_path)
    ds = Taskonomy(tmp_path, "test", size=(10, 14))
    s = ds[0]
    seg = np.asarray(Image.open(tmp_path / meta["test"][0][1])).astype(np.int64)
    expect = np.where(seg == 0, 255, seg - 1)
    assert torch.equal(s["segment_semantic"], torch.from_numpy(expect))
    dep = np.asarray(Image.open(tmp_path / meta["test"][0][3])).astype(np.float64)
    assert not s["depth_zbuffer_mask"][0, 0] and s["depth_zbuffer_mask"][0, 1] and not s["normal_mask"][0, 0]
    assert abs(float(s["depth_zbuffer"][0, 0, 1]) - np.log(101) / np.log(65536)) < 1e-6
    kp = np.asarray(Image.open(tmp_path / meta["test"][0][4])).astype(np.float64) / 65536
    np.testing.assert_allclose(s["keypoints2d"][0].numpy(), np.clip(kp, 0, 0.005) / 0.005 * 2 - 1, rtol=1e-5, atol=1e-6)
    assert s["edge_texture"].shape == (1, 10, 14) and s["edge_texture"].abs().max() <= 1
    assert ds.class_weights.shape == (17,)
    tr = Taskonomy(tmp_path, "train", crop_size=8, size=(10, 14), val_fraction=0.0)
    t = tr[0]
    assert t["image"].shape == (3, 8, 8) and t["keypoints2d_mask"].shape == (8, 8)


def test_taskonomy_errors(tmp_path):
    meta = _write_taskonomy(tmp_path)
    os.remove(tmp_path / meta["test"][2][4])
    with pytest.raises(DatasetError) as e:
        Taskonomy(tmp_path, "test")[2]
    assert meta["test"][2][4] in str(e.value) and str(tmp_path) in str(e.value)
    os.remove(tmp_path / "semseg_prior_factor.npy")
    with pytest.raises(DatasetError, match="semseg_prior_factor.npy"):
        Taskonomy(tmp_path, "test")


def test_collate_and_workers(tmp_path):
    make_synthetic_scenes(tmp_path, n_train=6, n_test=2, size=24, seed=0)
    ds = NYUv2(tmp_path, "train", crop_size=16, val_fraction=0.0)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_multitask)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].shape == (3, 3, 16, 16) and b["segment_semantic"].dtype == torch.int64
    assert b["normal_mask"].dtype == torch.bool and b["depth"].shape == (3, 1, 16, 16)
    assert b["index"] == [0, 1, 2]
    with pytest.raises(ValueError, match="shapes"):
        collate_multitask([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}])


def test_synthetic_deterministic(tmp_path):
    m1 = make_synthetic_scenes(tmp_path / "a", 3, 2, 32, seed=7)
    m2 = make_synthetic_scenes(tmp_path / "b", 3, 2, 32, seed=7)
    m3 = make_synthetic_scenes(tmp_path / "c", 3, 2, 32, seed=8)
    assert m1 == m2
    for entry in m1["train"] + m1["test"]:
        for p in entry:
            assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
    assert (tmp_path / "a" / m1["train"][0][0]).read_bytes() != (tmp_path / "c" / m3["train"][0][0]).read_bytes()


def test_synthetic_geometry_normals_agree_with_depth(tmp_path):
    make_synthetic_scenes(tmp_path, 4, 0, (48, 64), seed=1)
    raw = NYUv2(tmp_path, "train", val_fraction=0.0)
    errs = []
    for i in range(len(raw)):
        s = raw.load_raw(i)
        d = s["depth"][0].double().numpy()
        h, w = d.shape
        f = 0.81 * w
        v, u = np.mgrid[0:h, 0:w]
        pts = np.stack([(u + 0.5 - w / 2) / f * d, (v + 0.5 - h / 2) / f * d, d], -1)
        dx, dy = pts[1:-1, 2:] - pts[1:-1, :-2], pts[2:, 1:-1] - pts[:-2, 1:-1]
        n = np.cross(dy, dx)  # y-down, x-right: dy x dx faces the camera
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
        gt = s["normal"].double().numpy().transpose(1, 2, 0)[1:-1, 1:-1]
        seg = s["segment_semantic"].numpy()
        # interior of smooth regions: the 3x3 neighbourhood is valid, one class, no depth jump
        ok = s["depth_mask"].numpy()[1:-1, 1:-1] & s["normal_mask"].numpy()[1:-1, 1:-1]
        for dy_, dx_ in ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1)):
            nb = np.roll(np.roll(d, dy_, 0), dx_, 1)[1:-1, 1:-1]
            nbs = np.roll(np.roll(seg, dy_, 0), dx_, 1)[1:-1, 1:-1]
            ok &= (np.abs(nb - d[1:-1, 1:-1]) < 0.05 * d[1:-1, 1:-1]) & (nbs == seg[1:-1, 1:-1]) & (nb > 0)
        cos = np.clip((n * gt).sum(-1) / np.linalg.norm(gt, axis=-1).clip(1e-9), -1, 1)
        errs.append(np.degrees(np.arccos(cos[ok])))
    errs = np.concatenate(errs)
    assert errs.size > 2000
    assert np.median(errs) < 3.0 and np.mean(errs < 10) > 0.9


def test_synthetic_labels_and_holes(tmp_path):
    make_synthetic_scenes(tmp_path, 12, 2, 32, seed=3)
    ds = NYUv2(tmp_path, "test", crop_size=32)
    assert len(ds) == 2
    raw = NYUv2(tmp_path, "train", val_fraction=0.0)
    classes, holes = set(), 0
    for i in range(len(raw)):
        s = raw.load_raw(i)
        classes |= set(s["segment_semantic"].unique().tolist())
        holes += int((~s["depth_mask"]).sum())
        assert torch.equal(s["depth_mask"], s["normal_mask"])  # sensor holes hit depth and normals together
        nrm = s["normal"][:, s["normal_mask"]]
        assert torch.allclose(nrm.norm(dim=0), torch.ones(nrm.shape[1]), atol=0.02)
    assert {0, 1} <= classes and len(classes) >= 5 and holes > 0
    with pytest.raises(ValueError):
        make_synthetic_scenes(tmp_path, 0, 0)


def test_normal_png_roundtrip():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(3, 5, 6))
    n /= np.linalg.norm(n, axis=0, keepdims=True)
    valid = rng.random((5, 6)) > 0.3
    png = encode_normal(n, valid)
    assert png.dtype == np.uint8 and np.all(png[~valid] == 255) and not np.any(png[valid] == 255)
    back, bvalid = decode_normal(png)
    assert np.array_equal(bvalid, valid)
    assert np.abs(back[:, valid] - n[:, valid]).max() < 1.5 / 255 * 2
