"""A procedural image world: coloured shapes on textured backgrounds, with English captions.

Every image is 32x32 RGB uint8 and shows one object described by a few attributes:

- ``shape``: circle, square, triangle, cross, ring, diamond, star, bar;
- ``colour``: red, green, blue, yellow, purple, orange, pink, cyan, white, brown (jittered RGB);
- ``size``: small, medium, large (the object's radius), and a free rotation where it does not change
  the shape's name (a square turned by 45 degrees would be a diamond, so squares only wobble);
- ``position``: anywhere the object fits ("in the top left", "on the right", "in the center"...);
- ``background``: dark or light, plain / gradient / striped / checkered / blotchy texture;
- ``noise``: Gaussian pixel noise;
- ``tint``: the strength of a blue light over the whole scene (downstream task only).

Images are rendered in numpy, vectorised over the batch, at twice the resolution and box-filtered
down (anti-aliased edges). :func:`sample_attributes` draws attributes, :func:`render` draws them,
:func:`caption` describes one image in varied English ("a small red circle on a dark background").

Two uses:

- the downstream task :func:`load_synthetic`: classes are (colour, shape) combinations such as
  "red circle" or "blue triangle", chosen so that every colour and every shape occurs in several
  classes (neither attribute alone identifies the class); size, position, rotation, background and
  noise are nuisance. The scene is lit by a blue light (``tint``, default 0.6) that the pretraining
  world never shows and the zero-shot prompt "a photo of a {class}." does not mention: the domain
  shift that makes zero-shot accuracy clearly lower than what learned prompts (or a linear probe)
  reach, as with CLIP on real downstream datasets. Deterministic in ``seed`` (its own
  ``np.random.default_rng``, never the global RNG state);
- pretraining the tiny CLIP shipped with the package (:mod:`dpfpl.pretrain`), which draws fresh
  image-caption pairs from :func:`pretrain_batch` with seeds disjoint from the downstream ones,
  white light and a milder nuisance distribution (less noise, fewer textured backgrounds).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import ConfigError
from .base import ArraySplit, Dataset

IMAGE_SIZE = 32
_SS = 2  # supersampling factor

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar"]
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 40),
    "purple": (135, 50, 185),
    "orange": (245, 135, 25),
    "pink": (245, 125, 185),
    "cyan": (40, 200, 215),
    "white": (245, 245, 245),
    "brown": (125, 75, 35),
}
COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
SIZES = ["small", "medium", "large"]
_SIZE_RADIUS = np.array([[5.5, 7.5], [7.5, 10.0], [10.0, 13.0]], dtype=np.float32)  # pixels (32 px scale)
TEXTURES = ["plain", "gradient", "striped", "checkered", "blotchy"]
# shapes whose name survives any rotation get a free angle, the others only wobble
_FREE_ROTATION = {"circle", "ring", "bar"}

# Downstream seeds are used as given; pretraining streams are offset far away so that the two never
# share a generator seed.
PRETRAIN_SEED_OFFSET = 1_000_003

# The downstream task is "shot under a blue light": the whole scene is multiplied by the per-channel
# gains ``1 + tint * (BLUE_LIGHT - 1)``. The pretraining world is lit by white light only, and the
# zero-shot prompt "a photo of a {class}." does not mention the light: a domain shift that a linear
# probe or learned prompt context can adapt to, and that hand-written zero-shot prompts do not.
BLUE_LIGHT = (0.55, 0.8, 1.3)
DEFAULT_TINT = 0.6

# Nuisance distributions: the downstream task is a bit harsher than the pretraining world.
DOWNSTREAM_NUISANCE = dict(noise=(0.0, 16.0), texture_p=(0.25, 0.15, 0.2, 0.2, 0.2), jitter=22.0)
PRETRAIN_NUISANCE = dict(noise=(0.0, 8.0), texture_p=(0.5, 0.2, 0.1, 0.1, 0.1), jitter=18.0)


# ----------------------------------------------------------------------------------------------
# attributes


def sample_attributes(
    rng: np.random.Generator,
    n: int,
    shape: Optional[np.ndarray] = None,
    colour: Optional[np.ndarray] = None,
    noise: tuple[float, float] = DOWNSTREAM_NUISANCE["noise"],
    texture_p: tuple[float, ...] = DOWNSTREAM_NUISANCE["texture_p"],
    jitter: float = DOWNSTREAM_NUISANCE["jitter"],
    tint: float = 0.0,
) -> dict[str, np.ndarray]:
    """Draw ``n`` attribute records (a dict of arrays, one entry per image).

    ``shape`` / ``colour`` (int arrays indexing :data:`SHAPES` / :data:`COLOUR_NAMES`) fix those
    attributes; otherwise they are uniform. ``tint`` is the strength of the blue light (0: white).
    """
    shape = rng.integers(0, len(SHAPES), n) if shape is None else np.asarray(shape, dtype=np.int64)
    colour = rng.integers(0, len(COLOURS), n) if colour is None else np.asarray(colour, dtype=np.int64)
    size = rng.integers(0, len(SIZES), n)
    lo, hi = _SIZE_RADIUS[size, 0], _SIZE_RADIUS[size, 1]
    radius = lo + (hi - lo) * rng.random(n, dtype=np.float32)
    margin = radius + 1.0
    cx = margin + (IMAGE_SIZE - 2 * margin) * rng.random(n, dtype=np.float32)
    cy = margin + (IMAGE_SIZE - 2 * margin) * rng.random(n, dtype=np.float32)
    free = np.isin(shape, [SHAPES.index(s) for s in _FREE_ROTATION])
    angle = np.where(free, rng.random(n) * np.pi, (rng.random(n) - 0.5) * np.deg2rad(30)).astype(np.float32)
    rgb = np.clip(_COLOUR_RGB[colour] + rng.uniform(-jitter, jitter, (n, 3)), 0, 255).astype(np.float32)
    # background: dark or light (white objects always on dark), slightly coloured, with a texture
    dark = rng.random(n) < 0.5
    dark |= colour == COLOUR_NAMES.index("white")
    level = np.where(dark, rng.uniform(10, 70, n), rng.uniform(175, 240, n))
    bg = np.clip(level[:, None] + rng.uniform(-18, 18, (n, 3)), 0, 255).astype(np.float32)
    contrast = rng.uniform(20, 45, n) * np.where(dark, 1.0, -1.0)
    bg2 = np.clip(bg + contrast[:, None] + rng.uniform(-10, 10, (n, 3)), 0, 255).astype(np.float32)
    p = np.asarray(texture_p, dtype=np.float64)
    texture = rng.choice(len(TEXTURES), n, p=p / p.sum())
    tex_angle = (rng.random(n) * np.pi).astype(np.float32)
    tex_freq = rng.uniform(0.6, 1.3, n).astype(np.float32)  # stripes: radians per pixel
    tex_cell = rng.integers(3, 7, n)  # checker cell size in pixels
    blotches = rng.random((n, 5, 5)).astype(np.float32)
    sigma = rng.uniform(noise[0], noise[1], n).astype(np.float32)
    noise_seed = rng.integers(0, 2**63 - 1, n)
    gain = np.broadcast_to(1 + float(tint) * (np.array(BLUE_LIGHT, dtype=np.float32) - 1), (n, 3))
    return dict(shape=shape, colour=colour, size=size, radius=radius, cx=cx, cy=cy, angle=angle,
                rgb=rgb, dark=dark, bg=bg, bg2=bg2, texture=texture, tex_angle=tex_angle,
                tex_freq=tex_freq, tex_cell=tex_cell, blotches=blotches, sigma=sigma,
                noise_seed=noise_seed, gain=gain.astype(np.float32))


def position_words(cx: float, cy: float) -> str:
    third = IMAGE_SIZE / 3
    h = "left" if cx < third + 1 else "right" if cx > 2 * third - 1 else ""
    v = "top" if cy < third + 1 else "bottom" if cy > 2 * third - 1 else ""
    if h and v:
        return f"in the {v} {h} corner"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the center"


def describe(attrs: dict[str, np.ndarray], i: int) -> dict[str, str]:
    """Words for image ``i``: shape, colour, size, position, background (brightness), texture."""
    return dict(
        shape=SHAPES[int(attrs["shape"][i])],
        colour=COLOUR_NAMES[int(attrs["colour"][i])],
        size=SIZES[int(attrs["size"][i])],
        position=position_words(float(attrs["cx"][i]), float(attrs["cy"][i])),
        background="dark" if bool(attrs["dark"][i]) else "light",
        texture=TEXTURES[int(attrs["texture"][i])],
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_TEMPLATES = [
    "{a} {desc}",
    "a photo of {a} {desc}.",
    "a picture of {a} {desc}",
    "an image of {a} {desc}.",
    "{desc}",
    "there is {a} {desc}",
    "a drawing of {a} {desc}.",
    "{a} {desc} is shown",
]


def caption(words: dict[str, str], rng: Optional[np.random.Generator] = None) -> str:
    """An English caption of one image's attribute words (see :func:`describe`).

    Without ``rng`` the caption is the full canonical one
    ("a small red circle in the center on a dark striped background"); with ``rng`` the template,
    the word order and which optional attributes (size, position, background) are mentioned vary.
    """
    colour, shape, size = words["colour"], words["shape"], words["size"]
    bg = words["background"] + ("" if words["texture"] == "plain" else " " + words["texture"])
    if rng is None:
        desc = f"{size} {colour} {shape}"
        return f"{_article(desc)} {desc} {words['position']} on {_article(bg)} {bg} background"
    r = rng.random(6)
    if r[0] < 0.15:
        desc = f"{shape} that is {colour}" if r[1] < 0.5 else f"{colour} coloured {shape}"
    else:
        desc = f"{colour} {shape}"
    if r[2] < 0.45:
        desc = f"{size} {desc}"
    extras = []
    if r[3] < 0.3:
        extras.append(words["position"])
    if r[4] < 0.35:
        extras.append(f"on {_article(bg)} {bg} background")
    if len(extras) == 2 and r[5] < 0.5:
        extras.reverse()
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    text = template.format(a=_article(desc), desc=desc)
    if extras:
        text = text.rstrip(".") + " " + " ".join(extras) + ("." if text.endswith(".") else "")
    return text


def caption_words() -> list[str]:
    """Every word (and punctuation mark) :func:`caption` can produce, plus the zero-shot template's."""
    words = set(SHAPES) | set(COLOUR_NAMES) | set(SIZES) | set(TEXTURES) | {"dark", "light"}
    words |= {"a", "an", "that", "is", "coloured", "on", "background", ".", "photo", "of"}
    for t in _TEMPLATES:
        words |= set(t.replace("{a}", " ").replace("{desc}", " ").replace(".", " . ").split())
    grid = np.arange(IMAGE_SIZE + 1, dtype=np.float32)
    for cx in grid:
        for cy in grid:
            words |= set(position_words(float(cx), float(cy)).split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# rendering


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of ``kind`` in object coordinates (u right, v down; r radius, broadcastable)."""
    au, av = np.abs(u), np.abs(v)
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return np.maximum(au, av) <= 0.8 * r
    if kind == "diamond":
        return au + av <= 1.05 * r
    if kind == "triangle":
        return (v <= 0.55 * r) & (v >= -r + 1.732 * au)
    if kind == "cross":
        w = 0.3 * r
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    if kind == "star":
        theta = np.arctan2(u, -v)  # 0 = pointing up
        t = (theta * (5 / (2 * np.pi))) % 1.0
        tri = np.abs(t - 0.5) * 2  # 1 at the tips, 0 between
        rad = r * (0.42 + 0.58 * tri**1.5)
        return u * u + v * v <= rad * rad
    if kind == "bar":
        return (au <= r) & (av <= 0.3 * r)
    raise ValueError(kind)


def _background(a: dict[str, np.ndarray], idx: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(len(idx), H, W) blend weight of ``bg2`` over ``bg`` for the textures of images ``idx``."""
    n = len(idx)
    h = x.shape[-1]
    w = np.zeros((n, h, h), dtype=np.float32)
    tex = a["texture"][idx]
    ang = a["tex_angle"][idx][:, None, None]
    for t, name in enumerate(TEXTURES):
        sel = np.nonzero(tex == t)[0]
        if len(sel) == 0 or name == "plain":
            continue
        if name == "gradient":
            proj = (x - IMAGE_SIZE / 2) * np.cos(ang[sel]) + (y - IMAGE_SIZE / 2) * np.sin(ang[sel])
            w[sel] = np.clip(0.5 + proj / IMAGE_SIZE, 0, 1)
        elif name == "striped":
            proj = x * np.cos(ang[sel]) + y * np.sin(ang[sel])
            w[sel] = (np.sin(proj * a["tex_freq"][idx][sel][:, None, None]) > 0).astype(np.float32)
        elif name == "checkered":
            cell = a["tex_cell"][idx][sel][:, None, None]
            w[sel] = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
        elif name == "blotchy":
            # bilinear upsampling of a 5x5 random grid
            g = a["blotches"][idx][sel]  # (m, 5, 5)
            pos = (np.arange(h, dtype=np.float32) + 0.5) / h * 4
            i0 = np.clip(np.floor(pos).astype(int), 0, 3)
            f = pos - i0
            rows = g[:, i0, :] * (1 - f)[None, :, None] + g[:, i0 + 1, :] * f[None, :, None]
            w[sel] = rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]
    return w


def _coverage(a: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """(len(idx), 32, 32, 1) anti-aliased coverage of the objects of images ``idx``."""
    m = len(idx)
    h = IMAGE_SIZE * _SS
    hi = (np.arange(h, dtype=np.float32) + 0.5) / _SS
    dx = hi[None, None, :] - a["cx"][idx][:, None, None]
    dy = hi[None, :, None] - a["cy"][idx][:, None, None]
    c = np.cos(a["angle"][idx])[:, None, None]
    s = np.sin(a["angle"][idx])[:, None, None]
    u = dx * c + dy * s
    v = dy * c - dx * s
    mask = np.zeros((m, h, h), dtype=np.float32)
    shp = a["shape"][idx]
    rad = a["radius"][idx][:, None, None]
    for k, kind in enumerate(SHAPES):
        sel = np.nonzero(shp == k)[0]
        if len(sel):
            mask[sel] = _shape_mask(kind, u[sel], v[sel], rad[sel])
    cov = sum(mask[:, i::_SS, j::_SS] for i in range(_SS) for j in range(_SS)) * (1.0 / _SS**2)
    return cov[..., None]


def render(attrs: dict[str, np.ndarray], chunk: int = 512) -> np.ndarray:
    """Draw the images described by ``attrs``: uint8 (N, 32, 32, 3). Deterministic in ``attrs``.

    The object mask is computed at ``_SS`` times the resolution and averaged down to a coverage in
    [0, 1] (anti-aliased edges); the background is computed at pixel centres. The light's gains
    (``gain``) multiply the whole scene, then the pixel noise is added.
    """
    n = len(attrs["shape"])
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    lo = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    a = attrs
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        wbg = _background(a, idx, lo[None, None, :], lo[None, :, None])[..., None]
        bg, bg2 = a["bg"][idx][:, None, None, :], a["bg2"][idx][:, None, None, :]
        img = bg + (bg2 - bg) * wbg
        img += (a["rgb"][idx][:, None, None, :] - img) * _coverage(a, idx)
        img *= a["gain"][idx][:, None, None, :]
        # pixel noise, one generator per image so that an image does not depend on its batch
        for j, i in enumerate(idx):
            sigma = float(a["sigma"][i])
            if sigma > 0:
                gen = np.random.default_rng(int(a["noise_seed"][i]))
                img[j] += gen.standard_normal(img[j].shape, dtype=np.float32) * sigma
        out[idx] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# downstream task


def class_table(n_classes: int) -> list[tuple[int, int]]:
    """The (colour, shape) index pairs of the first ``n_classes`` classes.

    Class i has colour ``i % 8`` and shape ``(i + 3 * (i // 8)) % 8`` (the first 8 colours and all 8
    shapes): the first 8 classes pair colour k with shape k, the next 8 shift the shapes by 3, and
    so on, so that with 16 classes every colour and every shape belongs to exactly two classes.
    """
    nc, ns = 8, len(SHAPES)
    if not 1 <= n_classes <= nc * ns:
        raise ConfigError(f"synthetic: n_classes={n_classes} must be in [1, {nc * ns}]")
    pairs = []
    for i in range(n_classes):
        shift = (3 * (i // nc)) % ns
        pairs.append((i % nc, (i + shift) % ns))
    assert len(set(pairs)) == len(pairs)
    return pairs


def class_names(n_classes: int) -> list[str]:
    return [f"{COLOUR_NAMES[c]} {SHAPES[s]}" for c, s in class_table(n_classes)]


def _split(rng: np.random.Generator, n_classes: int, per_class: int, origin: str, tint: float) -> ArraySplit:
    pairs = np.array(class_table(n_classes), dtype=np.int64)
    labels = np.repeat(np.arange(n_classes), per_class)
    labels = labels[rng.permutation(len(labels))]
    attrs = sample_attributes(rng, len(labels), shape=pairs[labels, 1], colour=pairs[labels, 0],
                              tint=tint)
    return ArraySplit(render(attrs), labels, origin=origin)


def load_synthetic(
    root: Any = None,
    seed: int = 0,
    n_classes: int = 16,
    train_per_class: int = 40,
    test_per_class: int = 25,
    tint: float = DEFAULT_TINT,
    **kw: Any,
) -> Dataset:
    """The synthetic downstream task: ``n_classes`` colour-shape classes ("red circle", ...).

    ``root`` is ignored (the data is generated). Train and test are independent draws; everything
    is a function of the arguments only. ``tint`` in [0, 2] is the strength of the blue light (0:
    the white light of the pretraining world, where the builtin model's zero-shot accuracy is near
    perfect). Unknown keyword options are rejected.
    """
    if kw:
        raise ConfigError(f"synthetic dataset: unknown option(s) {sorted(kw)} "
                          "(known: seed, n_classes, train_per_class, test_per_class, tint)")
    if not 0.0 <= float(tint) <= 2.0:
        raise ConfigError(f"synthetic: tint={tint} must be in [0, 2]")
    for name, val in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if int(val) < 1:
            raise ConfigError(f"synthetic: {name}={val} must be >= 1")
    seed = int(seed)
    if not 0 <= seed < PRETRAIN_SEED_OFFSET:
        raise ConfigError(f"synthetic: seed={seed} must be in [0, {PRETRAIN_SEED_OFFSET})")
    names = class_names(int(n_classes))
    train_rng, test_rng = (np.random.default_rng([seed, k]) for k in (0, 1))
    opts = dict(tint=float(tint))
    train = _split(train_rng, len(names), int(train_per_class), f"synthetic(seed={seed}).train", **opts)
    test = _split(test_rng, len(names), int(test_per_class), f"synthetic(seed={seed}).test", **opts)
    ds = Dataset(name="synthetic", classnames=names, train=train, test=test)
    ds.validate()
    return ds


# ----------------------------------------------------------------------------------------------
# pretraining stream


def pretrain_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` fresh (image, caption) pairs of the pretraining world: any colour, any shape."""
    attrs = sample_attributes(rng, n, **PRETRAIN_NUISANCE)
    images = render(attrs)
    captions = [caption(describe(attrs, i), rng) for i in range(n)]
    return images, captions


def pretrain_rng(seed: int) -> np.random.Generator:
    """The generator of the pretraining stream for ``seed`` (disjoint from downstream seeds)."""
    return np.random.default_rng([PRETRAIN_SEED_OFFSET + int(seed), 7])
