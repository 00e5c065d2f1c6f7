"""The chest of one synthetic patient: parameters drawn once, then rendered slice by slice.

Coordinates are millimetres in the canonical frame (``docs/architecture.md``): ``x`` from the patient's right to
left (columns), ``y`` from anterior to posterior (rows), ``z`` from inferior to superior (slices), with the body's
centre at ``x = y = 0``. Every structure is a function of ``z`` that varies smoothly, so one axial slice is drawn
in 2D from a handful of numbers; tubular structures that run obliquely (ribs, vessels, airways) are drawn in 3D
by :mod:`covidseg.phantom.trees`.

Hounsfield values follow textbook ranges (e.g. Hofer, *CT Teaching Manual*, 4th ed.): air -1000, lung parenchyma
about -850 with a dependent (posterior) gradient, fat about -100, muscle and blood about +40, liver about +60,
trabecular bone about +250 and cortical bone +700 and above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidseg.phantom.shapes import SliceCanvas, soft

AIR_HU = -1000.0
"""Air outside the body and in the airways (HU)."""
TABLE_HU = 120.0
"""Carbon-fibre patient table (HU)."""
CSF_HU = 15.0
"""Spinal canal (cord and cerebrospinal fluid), HU."""
DISC_HU = 85.0
"""Intervertebral disc (HU)."""
CARTILAGE_HU = 140.0
"""Costal cartilage (HU)."""
STOMACH_FLUID_HU = 15.0
"""Fluid in the stomach (HU)."""


@dataclass(frozen=True)
class Tissues:
    """Tissue values of one patient and scanner (HU)."""

    fat: float
    muscle: float
    blood: float
    liver: float
    spleen: float
    bone_cortex: float
    bone_marrow: float
    parenchyma: float
    parenchyma_gradient: float
    """Increase (HU) from the lung's centre to its posterior (dependent) edge."""
    mediastinal_fat: float


@dataclass(frozen=True)
class Anatomy:
    """Shape parameters of one chest (mm unless stated; see the module docstring for the frame)."""

    body_a: float
    body_b: float
    fat: float
    fat_post: float
    muscle_ant: float
    cav_a: float
    cav_y_ant: float
    cav_y_post: float
    z_base: float
    """Lowest point of the lungs (posterior costophrenic recess)."""
    z_apex: float
    taper_start: float
    """Fraction of the lung height above which the thorax narrows towards the apices."""
    dome_top_r: float
    dome_top_l: float
    dome_h: float
    x_mid: float
    strip_w: float
    heart_dx: float
    heart_a: float
    heart_b: float
    heart_angle: float
    heart_z0: float
    heart_z1: float
    pericardial_fat: float
    spine_r: float
    vert_h: float
    vert_phase: float
    aorta_r: float
    asc_r: float
    z_arch: float
    trachea_r: float
    z_carina: float
    sternum_a: float
    table_gap: float
    tissues: Tissues

    # ---- derived positions -------------------------------------------------------------------------------
    @property
    def ap_length(self) -> float:
        return self.cav_y_post - self.cav_y_ant

    @property
    def spine_y(self) -> float:
        return self.cav_y_post - 0.45 * self.spine_r

    @property
    def trachea_y(self) -> float:
        return self.spine_y - self.spine_r - 2.2 * self.trachea_r - 4.0

    @property
    def aorta_xy(self) -> tuple[float, float]:
        return self.x_mid + self.spine_r + 0.55 * self.aorta_r, self.spine_y - 0.75 * self.spine_r

    @property
    def asc_xy(self) -> tuple[float, float]:
        return self.x_mid - 0.2 * self.asc_r, self.cav_y_ant + 0.3 * self.ap_length

    @property
    def heart_xy(self) -> tuple[float, float]:
        return self.x_mid + self.heart_dx, self.cav_y_ant + 0.9 * self.heart_b + 4.0

    def t(self, z: float) -> float:
        """Normalised lung height: 0 at the lowest lung point, 1 at the apices."""
        return (z - self.z_base) / (self.z_apex - self.z_base)

    def strip_half_width(self, z: float) -> float:
        """Half width (mm) of the central mediastinum between the lungs."""
        return self.strip_w * (1.0 + 0.9 * float(np.clip((self.t(z) - 0.45) / 0.45, 0.0, 1.0)))

    def cavity(self, z: float) -> tuple[float, float, float]:
        """Thoracic cavity (inside the ribs) at height ``z``: ``(centre_y, half_width, half_ap)`` in mm.

        The cavity is widest in the lower half and closes towards the apices, moving posteriorly as it does
        (the apices lie behind the clavicles).
        """
        t = self.t(z)
        s = 1.0
        if t > self.taper_start:
            u = min((t - self.taper_start) / (1.0 - self.taper_start), 1.0)
            s = max(1.0 - u**1.8, 0.0) ** 0.6
        cy0 = 0.5 * (self.cav_y_ant + self.cav_y_post)
        b0 = 0.5 * self.ap_length
        # the lower thorax flares slightly
        flare = 1.0 + 0.04 * float(np.clip(0.4 - t, 0.0, 0.4)) / 0.4
        return cy0 + (1.0 - s) * b0 * 0.6, self.cav_a * s * flare, b0 * s

    def dome_z(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Height (mm) of the diaphragm under ``(x, y)`` and the slope magnitude of that surface.

        Two paraboloid domes (the right one higher, over the liver), steeper posteriorly so that the
        costophrenic recesses reach lowest at the back.
        """
        cy, a, b = self.cavity(self.z_base + 0.2 * (self.z_apex - self.z_base))
        right = x < self.x_mid
        xd = np.where(right, self.x_mid - 0.45 * a, self.x_mid + 0.45 * a).astype(np.float32)
        top = np.where(right, self.dome_top_r, self.dome_top_l).astype(np.float32)
        ux = (x - xd) / np.float32(0.62 * a)
        vy = (y - np.float32(cy - 0.15 * b)) / np.float32(0.85 * b)
        ky = np.where(vy > 0, np.float32(1.7), np.float32(1.0))
        vy = vy * ky
        h = np.float32(self.dome_h)
        zd = top - h * (ux * ux + vy * vy)
        gx = 2.0 * h * ux / np.float32(0.62 * a)
        gy = 2.0 * h * vy * ky / np.float32(0.85 * b)
        return zd, np.sqrt(1.0 + gx * gx + gy * gy)


def draw_anatomy(rng: np.random.Generator, z_extent: float, margin_bottom: float, margin_top: float,
                 fov: float) -> Anatomy:
    """Draw one patient's chest.

    Args:
        rng: random generator (all variation comes from it).
        z_extent: length (mm) covered by the slices.
        margin_bottom, margin_top: distance (mm) from the first slice to the lung bases and from the apices to
            the last slice.
        fov: in-plane field of view (mm); the body is drawn to fit inside it.
    """
    u = rng.uniform
    body_a = min(u(140.0, 190.0), 0.46 * fov - 8.0)
    body_b = body_a * u(0.62, 0.78)
    fat = u(5.0, 24.0) * body_a / 160.0
    fat_post = fat * u(0.5, 0.8)
    muscle_ant = u(8.0, 18.0)
    cav_a = body_a - fat - u(10.0, 16.0)
    cav_y_ant = -(body_b - fat - muscle_ant - 6.0)
    cav_y_post = body_b - fat_post - u(32.0, 42.0)
    z_base = margin_bottom
    z_apex = z_extent - margin_top
    height = z_apex - z_base
    dome_h = u(0.17, 0.24) * height
    dome_top_r = z_base + u(0.30, 0.38) * height
    dome_top_l = dome_top_r - u(0.03, 0.08) * height
    heart_b = u(44.0, 54.0) * (cav_y_post - cav_y_ant) / 170.0
    heart_z0 = dome_top_l - u(15.0, 25.0)
    t_soft = Tissues(
        fat=u(-115.0, -85.0), muscle=u(35.0, 55.0), blood=u(32.0, 48.0), liver=u(52.0, 68.0),
        spleen=u(40.0, 52.0), bone_cortex=u(750.0, 1150.0), bone_marrow=u(180.0, 320.0),
        parenchyma=u(-885.0, -830.0), parenchyma_gradient=u(15.0, 55.0), mediastinal_fat=u(-105.0, -80.0),
    )
    return Anatomy(
        body_a=body_a, body_b=body_b, fat=fat, fat_post=fat_post, muscle_ant=muscle_ant,
        cav_a=cav_a, cav_y_ant=cav_y_ant, cav_y_post=cav_y_post, z_base=z_base, z_apex=z_apex,
        taper_start=u(0.55, 0.68), dome_top_r=dome_top_r, dome_top_l=dome_top_l, dome_h=dome_h,
        x_mid=u(-4.0, 6.0), strip_w=u(9.0, 14.0),
        heart_dx=u(20.0, 34.0), heart_a=u(46.0, 56.0) * cav_a / 130.0, heart_b=heart_b,
        heart_angle=-u(0.45, 0.75), heart_z0=heart_z0, heart_z1=heart_z0 + u(0.36, 0.46) * height,
        pericardial_fat=u(2.0, 7.0), spine_r=u(15.0, 20.0), vert_h=u(22.0, 27.0), vert_phase=u(0.0, 25.0),
        aorta_r=u(10.0, 14.0), asc_r=u(13.0, 18.0), z_arch=z_base + u(0.76, 0.84) * height,
        trachea_r=u(7.5, 10.5), z_carina=z_base + u(0.62, 0.7) * height, sternum_a=u(11.0, 17.0),
        table_gap=u(2.0, 15.0), tissues=t_soft,
    )


def _heart_scale(an: Anatomy, z: float) -> float:
    """Cross-section scale of the heart at height ``z`` (0 outside it)."""
    half = 0.5 * (an.heart_z1 - an.heart_z0)
    e = (z - (an.heart_z0 + half)) / half
    if abs(e) >= 1.0:
        return 0.0
    # fuller at the bottom (ventricles on the diaphragm) than at the top (great vessels)
    return (1.0 - abs(e) ** (2.5 if e < 0 else 1.6)) ** 0.5


def paint_slice(an: Anatomy, z: float, xs: np.ndarray, ys: np.ndarray, edge: float,
                half_fov: float) -> tuple[np.ndarray, np.ndarray]:
    """Render the axial slice at height ``z``.

    Args:
        an: the chest.
        z: slice height (mm).
        xs, ys: column and row centres (mm).
        edge: partial-volume ramp width (mm).
        half_fov: half the field of view (mm); the table stops there.

    Returns:
        ``(hu, lung)``: the slice in HU (float32, ``(len(ys), len(xs))``) without vessels, ribs, lesions or noise,
        and the lung occupancy in [0, 1] (both lungs; the side is ``x > x_mid``). Lesions are added later and are
        inside the lungs by construction, as in expert masks.
    """
    ts = an.tissues
    cv = SliceCanvas(xs, ys, edge, AIR_HU)
    lung = np.zeros_like(cv.hu)

    # patient table: a shallow cradle under the back
    win = cv.window(0.0, an.body_b + an.table_gap + 12.0, min(half_fov, an.body_a * 1.3), 14.0)
    x, y = cv.grid(win)
    y_table = np.float32(an.body_b + an.table_gap) + np.float32(0.35 / an.body_a) * x * x
    band = np.minimum(soft(y_table - y, edge), soft(y - y_table - 7.0, edge))
    cv.paint(win, band, TABLE_HU)

    # body outline (flattened at the back, where the patient lies), subcutaneous fat, muscle
    win_body, body = cv.ellipse(0.0, 0.0, an.body_a, an.body_b)
    x, y = cv.grid(win_body)
    body = np.minimum(body, soft(y - np.float32(0.93 * an.body_b), edge))
    cv.paint(win_body, body, ts.fat)
    dy = 0.5 * (an.fat - an.fat_post)
    win, mus = cv.ellipse(0.0, -dy, an.body_a - an.fat, an.body_b - 0.5 * (an.fat + an.fat_post))
    cv.paint(win, mus, ts.muscle)

    # thoracic cavity: abdominal organs below the diaphragm, mediastinum, lungs
    cy, ca, cb = an.cavity(z)
    if ca > 2.0 and cb > 2.0:
        win, cav = cv.ellipse(0.0, cy, ca, cb)
        x, y = cv.grid(win)
        organ = np.where(x < an.x_mid + 15.0, np.float32(ts.liver), np.float32(ts.spleen))
        cv.paint(win, cav, organ)
        med = _mediastinum(cv, an, z, win)
        zd, slope = an.dome_z(x, y)
        above = soft((zd - np.float32(z)) / slope, edge)
        # stomach with its gas cap (anterior: the patient is supine) under the left dome
        sx, sy = an.x_mid + 0.45 * ca, an.cav_y_ant + 0.3 * an.ap_length
        win_s, sto = cv.ellipse(sx, sy, 0.3 * ca, 0.2 * an.ap_length)
        below = 1.0 - _sub(above, win, win_s)
        cv.paint(win_s, sto * below * _sub(cav, win, win_s), STOMACH_FLUID_HU)
        win_g, gas = cv.ellipse(sx, sy - 0.12 * an.ap_length, 0.24 * ca, 0.09 * an.ap_length)
        cv.paint(win_g, gas * (1.0 - _sub(above, win, win_g)) * _sub(cav, win, win_g), AIR_HU)
        lung_w = np.minimum(np.minimum(cav, 1.0 - med), above)
        med_fat = np.minimum(med, cav)
        cv.paint(win, med_fat, ts.mediastinal_fat)
        parenchyma = np.float32(ts.parenchyma) + np.float32(ts.parenchyma_gradient / cb) * (y - np.float32(cy))
        cv.paint(win, lung_w, parenchyma)
        lung[win] = lung_w
    _mediastinal_organs(cv, an, z)
    _spine_and_sternum(cv, an, z)
    return cv.hu, lung


def _sub(arr: np.ndarray, outer: tuple[slice, slice], inner: tuple[slice, slice]) -> np.ndarray:
    """The part of ``arr`` (defined on window ``outer``) that covers window ``inner`` (zero-padded)."""
    out = np.zeros((inner[0].stop - inner[0].start, inner[1].stop - inner[1].start), dtype=np.float32)
    r0, r1 = max(inner[0].start, outer[0].start), min(inner[0].stop, outer[0].stop)
    c0, c1 = max(inner[1].start, outer[1].start), min(inner[1].stop, outer[1].stop)
    if r1 > r0 and c1 > c0:
        out[r0 - inner[0].start:r1 - inner[0].start, c0 - inner[1].start:c1 - inner[1].start] = \
            arr[r0 - outer[0].start:r1 - outer[0].start, c0 - outer[1].start:c1 - outer[1].start]
    return out


def _union(med: np.ndarray, outer: tuple[slice, slice], win: tuple[slice, slice], occ: np.ndarray) -> None:
    """``med[win] = max(med[win], occ)`` where ``med`` lives on window ``outer``."""
    r0, r1 = max(win[0].start, outer[0].start), min(win[0].stop, outer[0].stop)
    c0, c1 = max(win[1].start, outer[1].start), min(win[1].stop, outer[1].stop)
    if r1 <= r0 or c1 <= c0:
        return
    dst = med[r0 - outer[0].start:r1 - outer[0].start, c0 - outer[1].start:c1 - outer[1].start]
    src = occ[r0 - win[0].start:r1 - win[0].start, c0 - win[1].start:c1 - win[1].start]
    np.maximum(dst, src, out=dst)


def _mediastinum(cv: SliceCanvas, an: Anatomy, z: float, outer: tuple[slice, slice]) -> np.ndarray:
    """Occupancy of everything between and behind the lungs that is not lung, on window ``outer``."""
    med = np.zeros((outer[0].stop - outer[0].start, outer[1].stop - outer[1].start), dtype=np.float32)
    x, y = cv.grid(outer)
    w = an.strip_half_width(z)
    # the lungs nearly meet in front (anterior junction line) and are kept apart behind the heart by the
    # oesophagus, aorta and azygos vein
    front = np.float32(an.cav_y_ant + 0.3 * an.ap_length)
    w_y = np.float32(0.35 * w) + np.float32(0.65 * w) * np.clip((y - front) / np.float32(25.0), 0.0, 1.0)
    med[:] = soft(np.abs(x - np.float32(an.x_mid)) - w_y, cv.edge)
    _union(med, outer, *cv.ellipse(an.x_mid, an.spine_y, an.spine_r + 6.0, an.spine_r + 4.0))
    ax, ay = an.aorta_xy
    if z < an.z_arch:
        _union(med, outer, *cv.ellipse(ax, ay, an.aorta_r + 3.0, an.aorta_r + 3.0))
    s = _heart_scale(an, z)
    if s > 0.05:
        hx, hy = an.heart_xy
        f = an.pericardial_fat
        _union(med, outer, *cv.ellipse(hx, hy, an.heart_a * s + f, an.heart_b * s + f, an.heart_angle))
    t = an.t(z)
    if t > 0.5:
        g = min((t - 0.5) / 0.15, 1.0)
        uy = an.cav_y_ant + 0.32 * an.ap_length
        _union(med, outer, *cv.ellipse(an.x_mid + 4.0, uy, 22.0 + 14.0 * g, 0.28 * an.ap_length))
    if abs(z - an.z_arch) < an.aorta_r + 4.0:
        _union(med, outer, *cv.capsule(an.asc_xy, (ax, ay), an.aorta_r + 3.0))
    return med


def _mediastinal_organs(cv: SliceCanvas, an: Anatomy, z: float) -> None:
    """Heart, great vessels, oesophagus and trachea (painted over the mediastinal fat)."""
    ts = an.tissues
    s = _heart_scale(an, z)
    if s > 0.05:
        hx, hy = an.heart_xy
        cv.paint(*cv.ellipse(hx, hy, an.heart_a * s, an.heart_b * s, an.heart_angle), ts.blood)
    ax, ay = an.aorta_xy
    if z < an.z_arch:
        cv.paint(*cv.ellipse(ax, ay, an.aorta_r, an.aorta_r), ts.blood)
    dz = abs(z - an.z_arch)
    if dz < an.aorta_r:
        cv.paint(*cv.capsule(an.asc_xy, (ax, ay), math.sqrt(an.aorta_r**2 - dz**2)), ts.blood)
    asc_x, asc_y = an.asc_xy
    heart_top = an.heart_z1 - 0.15 * (an.heart_z1 - an.heart_z0)
    if heart_top < z < an.z_arch:
        cv.paint(*cv.ellipse(asc_x, asc_y, an.asc_r, an.asc_r), ts.blood)
    if z > heart_top - 10.0:
        # superior vena cava (right of the aorta); above the arch the great vessels of the neck
        cv.paint(*cv.ellipse(asc_x - an.asc_r - 11.0, asc_y + 4.0, 9.5, 8.0), ts.blood)
    if z > an.z_arch + an.aorta_r:
        for dx, dy, r in ((-6.0, 0.0, 6.5), (10.0, 6.0, 5.0), (22.0, 14.0, 5.5)):
            cv.paint(*cv.ellipse(an.x_mid + dx, asc_y + dy, r, r), ts.blood)
    if heart_top - 20.0 < z < heart_top + 12.0:
        # pulmonary trunk (left of the ascending aorta)
        cv.paint(*cv.ellipse(asc_x + an.asc_r + 10.0, asc_y - 2.0, 12.0, 12.0), ts.blood)
    # oesophagus (mostly collapsed) in front of the spine, slightly left
    cv.paint(*cv.ellipse(an.x_mid + 5.0, an.spine_y - an.spine_r - 6.0, 8.0, 5.5), ts.muscle - 5.0)
    if z > an.z_carina:
        ty = an.trachea_y
        cv.paint(*cv.ellipse(an.x_mid, ty, an.trachea_r + 2.0, an.trachea_r + 1.6), ts.muscle - 10.0)
        cv.paint(*cv.ellipse(an.x_mid, ty, an.trachea_r, an.trachea_r * 0.85), AIR_HU)


def _spine_and_sternum(cv: SliceCanvas, an: Anatomy, z: float) -> None:
    """Vertebra at this level (body or disc, pedicles, lamina, spinous and transverse processes) and sternum."""
    ts = an.tissues
    r = an.spine_r
    sy = an.spine_y
    phase = (z + an.vert_phase) % an.vert_h
    disc = phase < 0.2 * an.vert_h
    # vertebral body (cortex + marrow) or intervertebral disc
    if disc:
        cv.paint(*cv.ellipse(an.x_mid, sy, r, 0.9 * r), DISC_HU)
    else:
        cv.paint(*cv.ellipse(an.x_mid, sy, r, 0.9 * r), ts.bone_cortex)
        cv.paint(*cv.ellipse(an.x_mid, sy, r - 1.8, 0.9 * r - 1.8), ts.bone_marrow)
    # posterior arch around the canal; spinous process pointing backwards and down
    canal_y = sy + 0.9 * r + 8.0
    arch = phase > 0.25 * an.vert_h
    if arch:
        cv.paint(*cv.ellipse(an.x_mid, canal_y + 1.0, 13.0, 12.0), ts.bone_cortex * 0.8)
        cv.paint(*cv.capsule((an.x_mid, canal_y + 8.0), (an.x_mid, canal_y + 28.0), 3.2), ts.bone_cortex * 0.8)
        cv.paint(*cv.capsule((an.x_mid, canal_y + 9.0), (an.x_mid, canal_y + 26.0), 1.5), ts.bone_marrow)
        if phase > 0.5 * an.vert_h:
            for side in (-1.0, 1.0):
                p1 = (an.x_mid + side * 30.0, canal_y + 12.0)
                cv.paint(*cv.capsule((an.x_mid + side * 8.0, canal_y - 2.0), p1, 4.2), ts.bone_cortex * 0.8)
                cv.paint(*cv.capsule((an.x_mid + side * 10.0, canal_y - 1.0), p1, 2.2), ts.bone_marrow)
    cv.paint(*cv.ellipse(an.x_mid, canal_y, 8.0, 7.0), CSF_HU)
    # sternum: manubrium high, body in the middle, xiphoid low
    t = an.t(z)
    if 0.22 < t < 0.95:
        a = an.sternum_a * (1.6 if t > 0.8 else 1.0)
        st_y = an.cav_y_ant - 5.0
        cv.paint(*cv.ellipse(an.x_mid, st_y, a, 6.5), ts.bone_cortex)
        cv.paint(*cv.ellipse(an.x_mid, st_y, a - 1.6, 4.9), ts.bone_marrow)
    # scapulae on the posterior chest wall (upper half)
    if t > 0.45:
        cy, ca, cb = an.cavity(an.z_base + 0.45 * (an.z_apex - an.z_base))
        for side in (-1.0, 1.0):
            phi = 0.33 * math.pi
            px = an.x_mid + side * (ca + 14.0) * math.sin(phi)
            py = cy + (cb + 14.0) * math.cos(phi)
            length = 40.0 * min((t - 0.45) / 0.15, 1.0)
            cv.paint(*cv.ellipse(px, py, length, 3.5, -side * phi), ts.bone_cortex * 0.85)
