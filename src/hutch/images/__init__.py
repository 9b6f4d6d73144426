"""Guest root filesystem images (base ext4 files shared read-only by boxes)."""

from hutch.images.builtin import busybox_image_key, ensure_busybox_image

__all__ = ["busybox_image_key", "ensure_busybox_image"]
