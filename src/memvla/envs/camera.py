"""Pinhole camera of the ego-centric tasks: intrinsics, poses, checks and unprojection.

Conventions (those of OpenCV):

* Camera frame: x right, y down, z forward (the optical axis). Depth is the z coordinate
  of the point a pixel sees (distance along the optical axis, not along the ray), metres.
* Pixel coordinates: column u and row v with the centre of pixel (0, 0) at (0, 0), so the
  principal point of a W×H image is ((W - 1) / 2, (H - 1) / 2). The intrinsics
  ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` map a camera point to
  ``(u, v, 1) ~ K (x, y, z)``.
* World frame: X east, Y north, Z up (right-handed), metres; the floor is Z = 0. A
  heading ``yaw`` is the angle of the camera's forward axis from +X, counter-clockwise
  seen from above (0 east, π/2 north).
* Pose: the 4×4 world-from-camera transform ``T = [[R, t], [0, 0, 0, 1]]`` with
  ``p_world = R p_cam + t``; the columns of R are the camera's right, down and forward
  axes in world coordinates, t its centre.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RIGID_TOL = 1e-4  # tolerance of the rigidity check (float32 poses)


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole intrinsics (3, 3) float64 with a horizontal field of view of ``fov_deg``
    spanning the image's full width (pixel edges -0.5 .. W - 0.5) and square pixels."""
    f = (width / 2) / np.tan(np.radians(fov_deg) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def pose_from_yaw(x: float, y: float, height: float, yaw: float) -> np.ndarray:
    """World-from-camera (4, 4) float64 of a level camera at (x, y, height) heading ``yaw``."""
    c, s = np.cos(yaw), np.sin(yaw)
    pose = np.eye(4)
    pose[:3, 0] = (s, -c, 0.0)  # right
    pose[:3, 1] = (0.0, 0.0, -1.0)  # down
    pose[:3, 2] = (c, s, 0.0)  # forward
    pose[:3, 3] = (x, y, height)
    return pose


def yaw_of(pose: np.ndarray) -> float:
    """Heading (radians, from +X counter-clockwise) of a pose's forward axis."""
    return float(np.arctan2(pose[1, 2], pose[0, 2]))


def check_pose(pose: Any, key: str = "pose") -> np.ndarray:
    """``pose`` as a float64 (4, 4) rigid transform, else a ValueError naming ``key``, what
    was expected and what was received (shape, last row, or how far R is from a rotation)."""
    try:
        p = np.asarray(pose, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: expected a 4x4 world-from-camera matrix, got {pose!r}") from e
    if p.shape != (4, 4):
        raise ValueError(f"{key}: expected shape (4, 4) (world-from-camera), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{key}: expected finite values, got {p.tolist()}")
    if not np.allclose(p[3], (0, 0, 0, 1), atol=RIGID_TOL):
        raise ValueError(f"{key}: expected the last row [0, 0, 0, 1] of a rigid transform, "
                         f"got {p[3].tolist()}")
    r = p[:3, :3]
    err = float(np.abs(r.T @ r - np.eye(3)).max())
    det = float(np.linalg.det(r))
    if err > RIGID_TOL or abs(det - 1) > RIGID_TOL:
        raise ValueError(f"{key}: expected a rigid transform (orthonormal rotation, det +1), "
                         f"got max |R^T R - I| = {err:.3g} and det R = {det:.4g}")
    return p


def check_intrinsics(k: Any, key: str = "intrinsics") -> np.ndarray:
    """``k`` as float64 (3, 3) pinhole intrinsics (fx, fy > 0, zero skew, last row 0 0 1)."""
    try:
        m = np.asarray(k, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: expected a 3x3 pinhole matrix, got {k!r}") from e
    if m.shape != (3, 3):
        raise ValueError(f"{key}: expected shape (3, 3), got {m.shape}")
    ok = (np.isfinite(m).all() and m[0, 0] > 0 and m[1, 1] > 0 and m[0, 1] == 0
          and m[1, 0] == 0 and np.allclose(m[2], (0, 0, 1)))
    if not ok:
        raise ValueError(f"{key}: expected [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, "
                         f"got {m.tolist()}")
    return m


def check_depth(depth: Any, shape: tuple[int, int], key: str = "depth") -> np.ndarray:
    """``depth`` as a float (H, W) map of finite non-negative metres with (H, W) = ``shape``."""
    d = np.asarray(depth)
    if d.shape != tuple(shape):
        raise ValueError(f"{key}: expected a depth map of shape {tuple(shape)} (H, W), "
                         f"got {d.shape}")
    if not np.issubdtype(d.dtype, np.floating):
        raise ValueError(f"{key}: expected float metres, got dtype {d.dtype}")
    if not (np.isfinite(d).all() and (d >= 0).all()):
        raise ValueError(f"{key}: expected finite depths >= 0, got values in "
                         f"[{np.nanmin(d):.3g}, {np.nanmax(d):.3g}]")
    return d


def pixel_rays(k: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame ray slopes of every column and row: x/z (W,) and y/z (H,)."""
    xs = (np.arange(width) - k[0, 2]) / k[0, 0]  # (W,)
    ys = (np.arange(height) - k[1, 2]) / k[1, 1]  # (H,)
    return xs, ys


def unproject(depth: Any, k: Any, pose: Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    """World points (H, W, 3) float64 that the pixels of ``depth`` (H, W) see.

    ``shape`` (H, W) is the image size the intrinsics belong to (default: the depth's own);
    a depth map of another resolution, a non-rigid pose or malformed intrinsics raise a
    ValueError naming the input, the expected and the received value."""
    k = check_intrinsics(k)
    pose = check_pose(pose)
    d = np.asarray(depth)
    d = check_depth(d, d.shape if shape is None else shape)
    h, w = d.shape
    xs, ys = pixel_rays(k, w, h)
    cam = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], np.ones((1, 1))), -1)  # (H, W, 3)
    cam = cam * d[..., None]  # (H, W, 3) camera-frame points
    return cam @ pose[:3, :3].T + pose[:3, 3]  # (H, W, 3)
