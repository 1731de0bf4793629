"""Subcommands of the ``memvla`` command line (see :mod:`memvla.cli`)."""
