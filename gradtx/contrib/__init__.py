"""Integrations with other libraries: Flax NNX training steps (:mod:`gradtx.contrib.flax`)."""
