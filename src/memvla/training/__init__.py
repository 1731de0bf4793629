"""Training: ``memvla train`` (see :func:`memvla.training.loop.train`)."""
