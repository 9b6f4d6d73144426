"""Throw-away hutch homes that share the default home's set-up artifacts (kernel, agent, busybox),
so tests can pull, load and remove images without touching the user's own image store."""

from __future__ import annotations

from pathlib import Path

from hutch.paths import HutchPaths


def make_home(root: Path, *, base_size: str = "256M", extra_config: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    default = HutchPaths.default()
    (root / "artifacts").symlink_to(default.artifacts)
    (root / "cache").symlink_to(default.cache)
    (root / "config.toml").write_text(f'[images]\nbase_size = "{base_size}"\n{extra_config}')
    return root
