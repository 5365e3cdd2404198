"""Built-in demo data: small rendered 3D rooms written in the NYUv2 (AdaShare) layout.

Each image is ray-cast under a pinhole camera (x right, y down, z forward; focal 0.81 * width, as
NYUv2's Kinect): a room (floor, ceiling, three walls) with boxes, spheres and cylinders at random
poses on the floor. Depth is the z-buffer depth, normals are the analytic surface normals in camera
coordinates (facing the camera) -- so normals agree with depth -- and the semantic class comes from
the object type. RGB = textured albedo x (ambient + Lambert) + noise. Invalid-pixel holes (random
ellipses) knock out depth+normals together, and separate ones the semantic label (255), as in
real Kinect data. Deterministic given the seed (each image has its own seeded generator).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from adapmtl.data.nyuv2 import JSON_NAME, encode_normal

# NYUv2 40-class indices (0-based) used by the synthetic scenes
WALL, FLOOR, CEILING = 0, 1, 21
BOX_CLASSES = (2, 16, 28)  # cabinet, dresser, box
SPHERE_CLASSES = (17, 39)  # pillow, otherprop
CYLINDER_CLASSES = (34, 38)  # lamp, otherfurniture
# more classes (n_classes > 10): extra object classes, (object kind 0 box / 1 sphere / 2 cylinder, class),
# added in this order; scenes with them also hold more objects (3-9 instead of 2-6)
EXTRA_CLASSES = ((0, 3), (1, 36), (2, 4), (0, 6), (1, 20), (2, 35))  # bed, bag, chair, table, clothes, bathtub
DEMO_CLASSES = 10
MAX_CLASSES = DEMO_CLASSES + len(EXTRA_CLASSES)
PARAMS_NAME = "synthetic.json"
_PALETTE = np.random.default_rng(12345).uniform(0.15, 0.95, size=(40, 3))


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _plane(o, d, normal, offset):
    """Hit of rays o + t d with {p : normal . p = offset}."""
    den = d @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset - o @ normal) / den
    t = np.where((np.abs(den) > 1e-9) & (t > 1e-6), t, np.inf)
    return t, np.broadcast_to(normal, d.shape)


def _box(o, d, center, half, yaw):
    r = _rot_y(yaw)
    lo, ld = (o - center) @ r, d @ r  # to box coordinates (r orthonormal: p_local = r^T p -> p @ r)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    t1, t2 = (-half - lo) * inv, (half - lo) * inv
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = np.argmax(tmin, axis=1)
    tn = tmin.max(axis=1)
    tf = tmax.min(axis=1)
    hit = (tn <= tf) & (tn > 1e-6)
    n_local = np.zeros_like(d)
    n_local[np.arange(len(d)), axis] = -np.sign(ld[np.arange(len(d)), axis])
    return np.where(hit, tn, np.inf), n_local @ r.T


def _sphere(o, d, center, radius):
    oc = o - center
    a = (d * d).sum(1)
    b = 2 * (d * oc).sum(1)
    c = (oc * oc).sum(1) - radius ** 2
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    t = np.where((disc > 0) & (t > 1e-6), t, np.inf)
    p = o + d * t[:, None]
    return t, (p - center) / radius


def _cylinder(o, d, base, radius, height):
    """Vertical cylinder, axis along y, bottom at base (y down: it spans y in [base_y - height, base_y])."""
    oc = o - base
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (d[:, 0] * oc[:, 0] + d[:, 2] * oc[:, 2])
    c = oc[:, 0] ** 2 + oc[:, 2] ** 2 - radius ** 2
    disc = b * b - 4 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    y = oc[:, 1] + ts * d[:, 1]
    side = (disc > 0) & (a > 1e-12) & (ts > 1e-6) & (y <= 0) & (y >= -height)
    ts = np.where(side, ts, np.inf)
    ns = np.stack([oc[:, 0] + ts * d[:, 0], np.zeros_like(a), oc[:, 2] + ts * d[:, 2]], 1) / radius
    tc, nc = _plane(o, d, np.array([0.0, -1.0, 0.0]), -(base[1] - height))  # top cap, facing up (-y)
    pc = o + d * np.where(np.isfinite(tc), tc, 0)[:, None]
    tc = np.where(((pc[:, 0] - base[0]) ** 2 + (pc[:, 2] - base[2]) ** 2 <= radius ** 2), tc, np.inf)
    use_cap = tc < ts
    return np.where(use_cap, tc, ts), np.where(use_cap[:, None], nc, ns)


def _ellipses(rng, h, w, count, max_frac=0.15):
    mask = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.02, max_frac) * h, rng.uniform(0.02, max_frac) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def object_classes(n_classes: int = DEMO_CLASSES) -> tuple[tuple, tuple, tuple]:
    """The classes of boxes, spheres and cylinders in scenes with n_classes classes in all."""
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or not DEMO_CLASSES <= n_classes <= MAX_CLASSES:
        raise ValueError(f"synthetic scenes: argument 'n_classes' must be an int in [{DEMO_CLASSES}, {MAX_CLASSES}], "
                         f"got {n_classes!r}")
    kinds = [list(BOX_CLASSES), list(SPHERE_CLASSES), list(CYLINDER_CLASSES)]
    for kind, cls in EXTRA_CLASSES[:n_classes - DEMO_CLASSES]:
        kinds[kind].append(cls)
    return tuple(tuple(k) for k in kinds)


def render_scene(rng: np.random.Generator, size=(64, 64), n_classes: int = DEMO_CLASSES,
                 camera_height: float | None = None) -> dict:
    """One scene -> dict rgb uint8 HxWx3, seg uint8 HxW, normal float 3xHxW, normal/depth validity, depth.
    n_classes > 10: more object classes (told apart by colour only within a shape) and more objects.
    camera_height: the same height in every scene (else drawn in [1.1, 1.6]); the draw is made either way, so
    the scenes differ only in it. With a fixed height and the fixed intrinsics the floor pins the depth scale."""
    box_classes, sphere_classes, cylinder_classes = object_classes(n_classes)
    lo, hi = (2, 7) if n_classes == DEMO_CLASSES else (3, 10)
    h, w = size
    f = 0.81 * w
    cam_h = rng.uniform(1.1, 1.6)  # camera height above the floor (floor at y = +cam_h)
    if camera_height is not None:
        cam_h = float(camera_height)
    room_d, room_l, room_r, room_top = rng.uniform(4.0, 7.0), rng.uniform(1.8, 3.0), rng.uniform(1.8, 3.0), rng.uniform(1.0, 1.5)
    rot = _rot_y(rng.uniform(-0.35, 0.35)) @ _rot_x(-rng.uniform(0.05, 0.3))  # camera -> world (pitch down)
    v, u = np.mgrid[0:h, 0:w]
    d_cam = np.stack([(u + 0.5 - w / 2) / f, (v + 0.5 - h / 2) / f, np.ones((h, w))], -1).reshape(-1, 3)
    d = d_cam @ rot.T
    o = np.zeros_like(d)

    prims = [  # (t, world normal, class, texture)
        (*_plane(o, d, np.array([0.0, 1.0, 0.0]), cam_h), FLOOR, "checker"),
        (*_plane(o, d, np.array([0.0, 1.0, 0.0]), -room_top), CEILING, "plain"),
        (*_plane(o, d, np.array([0.0, 0.0, 1.0]), room_d), WALL, "stripes"),
        (*_plane(o, d, np.array([1.0, 0.0, 0.0]), -room_l), WALL, "stripes"),
        (*_plane(o, d, np.array([1.0, 0.0, 0.0]), room_r), WALL, "stripes"),
    ]
    for _ in range(rng.integers(lo, hi)):
        kind = rng.integers(0, 3)
        x, z = rng.uniform(-room_l + 0.4, room_r - 0.4), rng.uniform(1.5, room_d - 0.4)
        if kind == 0:
            half = rng.uniform([0.2, 0.15, 0.2], [0.6, 0.7, 0.6])
            t, n = _box(o, d, np.array([x, cam_h - half[1], z]), half, rng.uniform(0, np.pi))
            cls = box_classes[rng.integers(len(box_classes))]
        elif kind == 1:
            r = rng.uniform(0.15, 0.45)
            t, n = _sphere(o, d, np.array([x, cam_h - r, z]), r)
            cls = sphere_classes[rng.integers(len(sphere_classes))]
        else:
            r, ht = rng.uniform(0.1, 0.35), rng.uniform(0.3, 1.4)
            t, n = _cylinder(o, d, np.array([x, cam_h, z]), r, ht)
            cls = cylinder_classes[rng.integers(len(cylinder_classes))]
        prims.append((t, n, cls, "noise"))

    ts = np.stack([p[0] for p in prims])  # [P, N]
    best = np.argmin(ts, axis=0)
    idx = np.arange(len(d))
    t = ts[best, idx]
    n_world = np.stack([np.broadcast_to(p[1], d.shape) for p in prims])[best, idx]
    n_world = n_world / np.linalg.norm(n_world, axis=1, keepdims=True)
    n_world = np.where(((n_world * d).sum(1) > 0)[:, None], -n_world, n_world)  # face the camera
    cls = np.array([p[2] for p in prims])[best]
    p_world = d * t[:, None]
    depth = t  # d_cam has z = 1, so the ray parameter is the z-buffer depth
    n_cam = n_world @ rot  # world -> camera: rot^T n

    # texture x shading
    albedo = _PALETTE[cls] * rng.uniform(0.85, 1.15, size=(len(prims), 3))[best].clip(0, 1.2)
    kinds = np.array([p[3] for p in prims])[best]
    checker = ((np.floor(p_world[:, 0] * 2) + np.floor(p_world[:, 2] * 2)) % 2) * 0.25 + 0.75
    stripes = 0.85 + 0.15 * np.sin(p_world[:, 1] * 12 + p_world[:, 0] * 3)
    tex = np.where(kinds == "checker", checker, 1.0)
    tex = np.where(kinds == "stripes", stripes, tex)
    tex = np.where(kinds == "noise", 0.9 + 0.1 * rng.standard_normal(len(d)), tex)
    light = np.array([0.3, -0.8, -0.5])  # from above-left-front (y is down)
    light = light / np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(n_world @ light, 0, None)
    rgb = albedo * (tex * shade)[:, None] * 255 + rng.normal(0, 3.0, size=(len(d), 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8).reshape(h, w, 3)

    depth = depth.reshape(h, w).astype(np.float32)
    normal = n_cam.reshape(h, w, 3).transpose(2, 0, 1).astype(np.float32)
    geo_valid = ~_ellipses(rng, h, w, rng.integers(0, 3))
    seg = cls.reshape(h, w).astype(np.uint8)
    seg[_ellipses(rng, h, w, rng.integers(0, 2), 0.1)] = 255
    depth[~geo_valid] = 0.0
    return {"rgb": rgb, "seg": seg, "normal": normal, "valid": geo_valid, "depth": depth}


def make_synthetic_scenes(root, n_train: int = 200, n_test: int = 50, size=64, seed: int = 0,
                          n_classes: int = DEMO_CLASSES, camera_height: float | None = None) -> dict:
    """Render n_train + n_test scenes of `size` (int or (H, W)) into `root` in the NYUv2 layout
    (`nyu_v2_3task.json`, img/*.png, seg/*.png, normal/*.png, depth/*.npy). Returns the JSON dict.
    Deterministic given the seed; `adapmtl.data.NYUv2(root, ...)` reads the result unchanged.
    `n_classes` (10..16): semantic classes in the scenes (above 10: harder, busier scenes); `camera_height`:
    one camera height for every scene (render_scene)."""
    object_classes(n_classes)  # checks it
    for arg, v in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"make_synthetic_scenes: argument '{arg}' must be an int >= 0, got {v!r}")
    if n_train + n_test == 0:
        raise ValueError("make_synthetic_scenes: n_train + n_test must be > 0")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 8 for s in size):
        raise ValueError(f"make_synthetic_scenes: argument 'size' must be an int >= 8 or (H, W), got {size!r}")
    root = os.fspath(root)
    for sub in ("img", "seg", "normal", "depth"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    meta = {"train": [], "test": []}
    for split, n, split_id in (("train", n_train, 0), ("test", n_test, 1)):
        for i in range(n):
            scene = render_scene(np.random.default_rng([seed, split_id, i]), size, n_classes, camera_height)
            stem = f"{split}_{i:05d}"
            paths = [f"img/{stem}.png", f"seg/{stem}.png", f"normal/{stem}.png", f"depth/{stem}.npy"]
            Image.fromarray(scene["rgb"], "RGB").save(os.path.join(root, paths[0]))
            Image.fromarray(scene["seg"], "L").save(os.path.join(root, paths[1]))
            Image.fromarray(encode_normal(scene["normal"], scene["valid"]), "RGB").save(os.path.join(root, paths[2]))
            np.save(os.path.join(root, paths[3]), scene["depth"])
            meta[split].append(paths)
    with open(os.path.join(root, PARAMS_NAME), "w") as fh:
        json.dump(synthetic_params(n_train, n_test, size, seed, n_classes, camera_height), fh)
    with open(os.path.join(root, JSON_NAME), "w") as fh:  # last: its presence means the folder is complete
        json.dump(meta, fh, indent=1)
    return meta


def synthetic_params(n_train: int, n_test: int, size, seed: int, n_classes: int = DEMO_CLASSES,
                     camera_height: float | None = None) -> dict:
    """What a folder of scenes was generated with (stored beside them as synthetic.json; n_classes and
    camera_height only when not the defaults, so folders written before they existed still match)."""
    size = [size, size] if isinstance(size, int) else list(size)
    params = {"n_train": n_train, "n_test": n_test, "size": size, "seed": seed}
    if n_classes != DEMO_CLASSES:
        params["n_classes"] = n_classes
    if camera_height is not None:
        params["camera_height"] = float(camera_height)
    return params


def read_synthetic_params(root) -> dict | None:
    """The parameters stored in a scenes folder, or None (no folder, or made by an older adapmtl)."""
    try:
        with open(os.path.join(os.fspath(root), PARAMS_NAME)) as fh:
            params = json.load(fh)
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) else None
