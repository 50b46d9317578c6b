"""The WSSS methods: each builds its network and computes its losses and CAMs."""

from wsss_fast.methods.toco import ToCo

__all__ = ["ToCo"]
