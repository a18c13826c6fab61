"""Procedural synthetic identities: the built-in default for training, tests and benchmarks.

Each identity is a latent vector (face shape, skin/hair/eye colour, eye/brow/nose/mouth geometry,
marks, beard, glasses); each image of it is rendered deterministically from ``(seed, identity,
index)`` with its own pose (roll, scale, shift, a yaw-like squeeze), lighting (gain, colour cast,
directional gradient), expression (smile, mouth opening, eye opening), background, blur, noise,
occlusion and JPEG artefacts. Per-image lighting and colour changes are deliberately larger than
many identity differences, so colour alone does not identify a face and an untrained network is
near chance; geometry and marks carry the identity.

Rendering happens at 112x112 in the coordinates of the ArcFace template (eyes near y=51.6) and is
resized afterwards, so a face looks the same at every training resolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from marginface.data.images import imwrite_rgb
from marginface.data.pairs import pairs_from_identities
from marginface.data.recordio import write_pack
from marginface.errors import UserError
from marginface.io.atomic import ensure_dir

CANVAS = 112
# Held-out verification identities come from a disjoint range of identity ids.
HELD_OUT_OFFSET = 1_000_000
# Pixel coordinates in [-0.5, 0.5) for the directional light gradient (read-only constants).
_YY, _XX = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS - 0.5
# Unit Gaussian noise texture, twice the canvas, sampled by random windows (cheaper than fresh noise).
_NOISE = np.random.default_rng(12345).standard_normal((2 * CANVAS, 2 * CANVAS, 3), dtype=np.float32)


@dataclass(frozen=True)
class Identity:
    """The latent of one synthetic person (all geometry in 112x112 canvas pixels)."""

    face_w: float
    face_h: float
    jaw: float  # 0 = oval chin, 1 = square jaw
    skin: np.ndarray  # RGB
    hair: np.ndarray  # RGB
    hair_top: float  # hairline height above the eyes
    hair_side: float  # how far hair comes down the sides
    fringe: float  # fringe slant (-1..1)
    eye_dx: float  # half distance between the eyes
    eye_y: float
    eye_w: float
    eye_h: float
    iris: np.ndarray  # RGB
    brow_gap: float
    brow_tilt: float
    brow_thick: int
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip: np.ndarray  # RGB
    marks: tuple  # ((x, y, r), ...) moles
    beard: float  # 0 none .. 1 full
    glasses: bool
    ear: float


def make_identity(seed: int, identity: int) -> Identity:
    """Sample the latent of identity ``identity`` (deterministic in ``seed`` and ``identity``)."""
    r = np.random.default_rng([seed, identity, 7])
    skin_base = np.array([224, 182, 150]) * r.uniform(0.45, 1.1)
    skin = np.clip(skin_base + r.normal(0, 12, 3), 30, 255)
    hair = np.clip(r.choice([[40, 30, 20], [90, 60, 30], [200, 170, 110], [140, 60, 30], [30, 30, 35],
                             [160, 160, 160]]) + r.normal(0, 15, 3), 0, 255)
    n_marks = r.integers(0, 4)
    marks = tuple((float(r.uniform(36, 76)), float(r.uniform(58, 98)), float(r.uniform(1.2, 2.6)))
                  for _ in range(n_marks))
    return Identity(
        face_w=r.uniform(30, 40), face_h=r.uniform(42, 52), jaw=r.uniform(0, 1),
        skin=skin, hair=hair, hair_top=r.uniform(18, 34), hair_side=r.uniform(0, 1),
        fringe=r.uniform(-1, 1),
        eye_dx=r.uniform(14, 21), eye_y=r.uniform(47, 56), eye_w=r.uniform(5, 9), eye_h=r.uniform(2.2, 4.5),
        iris=np.clip(r.choice([[70, 45, 25], [60, 110, 160], [80, 120, 70], [40, 30, 25]]) + r.normal(0, 10, 3), 0, 255),
        brow_gap=r.uniform(5, 11), brow_tilt=r.uniform(-0.25, 0.25), brow_thick=int(r.integers(1, 4)),
        nose_len=r.uniform(12, 24), nose_w=r.uniform(4, 10),
        mouth_y=r.uniform(84, 96), mouth_w=r.uniform(9, 18),
        lip=np.clip(skin * r.uniform(0.55, 0.85) + np.array([30, -10, -10]), 0, 255),
        marks=marks, beard=float(r.uniform(0, 1)) if r.random() < 0.3 else 0.0,
        glasses=bool(r.random() < 0.2), ear=r.uniform(0.6, 1.2),
    )


def _col(rgb) -> tuple:
    return tuple(int(c) for c in rgb)


def render(ident: Identity, rng: np.random.Generator, size: int = CANVAS) -> np.ndarray:
    """Render one image of ``ident`` with nuisance drawn from ``rng``; RGB uint8 ``size×size×3``."""
    s = 2  # draw at 2x: sub-pixel geometry and smooth edges after the warp down to the canvas
    big = CANVAS * s
    bg = rng.uniform(20, 235, 3)
    img = np.full((big, big, 3), bg.astype(np.uint8), np.uint8)
    yaw = rng.uniform(-0.35, 0.35)  # shifts inner features sideways, like a head turn
    smile = rng.uniform(-0.5, 1.0)
    mouth_open = max(0.0, rng.normal(0.0, 1.2))
    eye_open = float(np.clip(rng.normal(1.0, 0.25), 0.15, 1.3))

    def p(x, y):  # canvas -> big-canvas integer point
        return (int(round(x * s)), int(round(y * s)))

    cx, cy = 56.0, 66.0
    fx = cx + yaw * 6  # inner features move with yaw
    # hair behind the head
    if ident.hair_side > 0.3:
        cv2.ellipse(img, p(cx, cy - 4), p(ident.face_w + 5, ident.face_h * (0.6 + 0.5 * ident.hair_side)),
                    0, 180, 360, _col(ident.hair), -1)
    # ears
    for side in (-1, 1):
        cv2.ellipse(img, p(cx + side * ident.face_w * 0.97, ident.eye_y + 6), p(4 * ident.ear, 8 * ident.ear),
                    0, 0, 360, _col(ident.skin * 0.92), -1)
    # face: an ellipse blended with a squarer jaw polygon
    face_w = ident.face_w * (1 - abs(yaw) * 0.15)
    cv2.ellipse(img, p(cx, cy), p(face_w, ident.face_h), 0, 0, 360, _col(ident.skin), -1)
    if ident.jaw > 0.4:
        jw = face_w * (0.55 + 0.35 * ident.jaw)
        pts = np.array([p(cx - face_w * 0.98, cy), p(cx + face_w * 0.98, cy),
                        p(cx + jw, cy + ident.face_h * 0.85), p(cx - jw, cy + ident.face_h * 0.85)], np.int32)
        cv2.fillConvexPoly(img, pts, _col(ident.skin))
    if ident.beard > 0:
        beard_col = _col(ident.hair * 0.8)
        cv2.ellipse(img, p(fx, cy + ident.face_h * 0.45), p(face_w * 0.8, ident.face_h * 0.5 * ident.beard + 4),
                    0, 0, 180, beard_col, -1)
    # hair on top with a slanted fringe
    top = ident.eye_y - ident.hair_top
    cv2.ellipse(img, p(cx, ident.eye_y - 6), p(face_w + 2, ident.hair_top + 10), 0, 180, 360, _col(ident.hair), -1)
    fringe = np.array([p(cx - face_w - 2, ident.eye_y - 6), p(cx + face_w + 2, ident.eye_y - 6),
                       p(cx + face_w + 2, ident.eye_y - 12 - 6 * ident.fringe),
                       p(cx - face_w - 2, ident.eye_y - 12 + 6 * ident.fringe)], np.int32)
    cv2.fillConvexPoly(img, fringe, _col(ident.hair))
    cv2.ellipse(img, p(cx, top + 4), p(face_w * 0.8, 6), 0, 0, 360, _col(ident.hair), -1)
    # eyes, irises and brows
    for side in (-1, 1):
        ex = fx + side * ident.eye_dx
        cv2.ellipse(img, p(ex, ident.eye_y), p(ident.eye_w, ident.eye_h * eye_open), 0, 0, 360, (245, 245, 240), -1)
        cv2.circle(img, p(ex + yaw * 2, ident.eye_y), int(min(ident.eye_h * eye_open, ident.eye_w * 0.6) * s),
                   _col(ident.iris), -1)
        cv2.circle(img, p(ex + yaw * 2, ident.eye_y), int(1.0 * s), (15, 15, 15), -1)
        by = ident.eye_y - ident.brow_gap
        tilt = side * ident.brow_tilt * ident.eye_w
        cv2.line(img, p(ex - ident.eye_w, by + tilt), p(ex + ident.eye_w, by - tilt),
                 _col(ident.hair * 0.7), ident.brow_thick * s)
        if ident.glasses:
            cv2.circle(img, p(ex, ident.eye_y), int((ident.eye_w + 3) * s), (25, 25, 25), s)
    if ident.glasses:
        cv2.line(img, p(fx - ident.eye_dx + ident.eye_w + 3, ident.eye_y),
                 p(fx + ident.eye_dx - ident.eye_w - 3, ident.eye_y), (25, 25, 25), s)
    # nose
    ny = ident.eye_y + ident.nose_len
    nose = np.array([p(fx + yaw * 3, ident.eye_y + 3), p(fx + yaw * 5 - ident.nose_w / 2, ny),
                     p(fx + yaw * 5 + ident.nose_w / 2, ny)], np.int32)
    cv2.fillConvexPoly(img, nose, _col(ident.skin * 0.8))
    cv2.circle(img, p(fx + yaw * 5 - ident.nose_w / 4, ny), int(1.2 * s), _col(ident.skin * 0.5), -1)
    cv2.circle(img, p(fx + yaw * 5 + ident.nose_w / 4, ny), int(1.2 * s), _col(ident.skin * 0.5), -1)
    # mouth: smile curvature and opening vary with expression
    mw, my = ident.mouth_w, ident.mouth_y
    curve = smile * 4
    lips = np.array([p(fx - mw, my), p(fx - mw / 2, my + curve * 0.6 + mouth_open), p(fx, my + curve + mouth_open),
                     p(fx + mw / 2, my + curve * 0.6 + mouth_open), p(fx + mw, my),
                     p(fx + mw / 2, my - 1.5), p(fx, my - 2.5), p(fx - mw / 2, my - 1.5)], np.int32)
    cv2.fillPoly(img, [lips], _col(ident.lip))
    if mouth_open > 1:
        cv2.ellipse(img, p(fx, my + mouth_open * 0.5), p(mw * 0.6, mouth_open * 0.5), 0, 0, 360, (60, 20, 20), -1)
    for mx, mark_y, mr in ident.marks:
        cv2.circle(img, p(mx + yaw * 4, mark_y), max(1, int(mr * s)), _col(ident.skin * 0.35), -1)

    # pose: roll, scale, shift (a similarity warp around the face centre)
    angle = rng.normal(0, 8)
    scale = rng.uniform(0.88, 1.12)
    small = cv2.warpAffine(img, _big_to_canvas(cx, cy, s, angle, scale, rng), (CANVAS, CANVAS),
                           flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    # lighting: gain, colour cast, directional gradient
    gain = rng.uniform(0.55, 1.35)
    cast = rng.normal(1.0, 0.12, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    grad = np.float32(gain) * (1.0 + np.float32(rng.uniform(0, 0.6)) * (np.cos(theta, dtype=np.float32) * _XX
                                                                         + np.sin(theta, dtype=np.float32) * _YY))
    small = small * grad[..., None] * cast
    if rng.random() < 0.25:  # occlusion: a random block (hand, object, mask)
        ox, oy = rng.integers(0, CANVAS - 30, 2)
        ow, oh = rng.integers(12, 40, 2)
        small[oy:oy + oh, ox:ox + ow] = rng.uniform(0, 255, 3)
    sigma = rng.uniform(0, 1.4)
    if sigma > 0.3:
        small = cv2.GaussianBlur(small, (0, 0), sigma)
    oy, ox = rng.integers(0, CANVAS, 2)  # sensor noise: a random window of a fixed noise texture
    small += _NOISE[oy:oy + CANVAS, ox:ox + CANVAS] * np.float32(rng.uniform(0, 8))
    out = np.clip(small, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # JPEG artefacts
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 90))])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if size != CANVAS:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return out


def _big_to_canvas(cx: float, cy: float, s: int, angle: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Affine map from the 4x drawing canvas to the 112 canvas: roll+scale about the face centre, then shift."""
    a = np.deg2rad(angle)
    k = scale / s
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) * k
    shift = rng.normal(0, 3, 2)
    t = np.array([cx, cy]) - rot @ np.array([cx * s, cy * s]) + shift
    return np.hstack([rot, t[:, None]]).astype(np.float64)


def render_image(seed: int, identity: int, index: int, size: int = CANVAS) -> np.ndarray:
    """Image ``index`` of ``identity``: fully determined by ``(seed, identity, index)``."""
    return render(make_identity(seed, identity), np.random.default_rng([seed, identity, index, 11]), size)


class SyntheticSource:
    """``num_identities`` x ``images_per_identity`` procedural faces, rendered once into memory.

    Follows the training-source protocol (``__len__``, ``num_classes``, ``labels``, ``read``,
    ``describe``). Image ``i`` is image ``i % images_per_identity`` of identity
    ``identity_offset + i // images_per_identity``.
    """

    def __init__(self, num_identities: int = 1000, images_per_identity: int = 20, image_size: int = CANVAS,
                 seed: int = 0, identity_offset: int = 0):
        if num_identities < 1 or images_per_identity < 1:
            raise UserError(f"synthetic data needs >= 1 identity and image, got {num_identities} x {images_per_identity}")
        self.num_classes = num_identities
        self.images_per_identity = images_per_identity
        self.image_size = image_size
        self.seed = seed
        self.identity_offset = identity_offset
        self.labels = np.repeat(np.arange(num_identities, dtype=np.int64), images_per_identity)
        self._images = render_identities(range(identity_offset, identity_offset + num_identities),
                                         images_per_identity, image_size, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray:
        return self._images[i]

    @property
    def images(self) -> np.ndarray:
        return self._images

    def describe(self) -> str:
        return (f"synthetic: {self.num_classes} identities x {self.images_per_identity} images, "
                f"{self.image_size}px, seed {self.seed}")


def render_identities(identities, images_per_identity: int, size: int, seed: int) -> np.ndarray:
    """Render ``images_per_identity`` images of each identity id into one ``N×size×size×3`` array."""
    identities = list(identities)
    out = np.empty((len(identities) * images_per_identity, size, size, 3), np.uint8)
    k = 0
    for ident_id in identities:
        ident = make_identity(seed, ident_id)
        for j in range(images_per_identity):
            out[k] = render(ident, np.random.default_rng([seed, ident_id, j, 11]), size)
            k += 1
    return out


def synthetic_pair_set(num_identities: int = 200, images_per_identity: int = 6, num_pairs: int = 2000,
                       image_size: int = CANVAS, seed: int = 0, name: str = "synthetic"):
    """A balanced verification set over identities never used for training (a disjoint id range)."""
    src = SyntheticSource(num_identities, images_per_identity, image_size, seed, identity_offset=HELD_OUT_OFFSET)
    ps = pairs_from_identities(src.images, src.labels, num_pairs, seed)
    ps.name = name
    return ps


def write_synthetic(out: str, identities: int = 100, images_per_identity: int = 10, image_size: int = CANVAS,
                    seed: int = 0, fmt: str = "folder") -> dict:
    """Write synthetic identities as an image folder (``out/<id>/<n>.jpg``) or a RecordIO pack."""
    src = SyntheticSource(identities, images_per_identity, image_size, seed)
    root = ensure_dir(out)
    if fmt == "folder":
        for i in range(len(src)):
            label, j = divmod(i, images_per_identity)
            d = ensure_dir(root / f"id{label:06d}")
            imwrite_rgb(d / f"{j:04d}.jpg", src.read(i), [cv2.IMWRITE_JPEG_QUALITY, 95])  # UserError if it fails
    elif fmt == "rec":
        def encoded():
            for i in range(len(src)):
                ok, buf = cv2.imencode(".jpg", src.read(i)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                yield buf.tobytes(), int(src.labels[i])

        write_pack(root, encoded(), identities, (image_size, image_size))
    else:
        raise UserError(f"unknown synthetic output format {fmt!r}: choose folder or rec")
    return {"path": str(root), "format": fmt, "identities": identities, "images": len(src)}
