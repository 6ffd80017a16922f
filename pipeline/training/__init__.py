"""Distributed training: the per-worker loop, its parts, and the driver that launches it."""
