"""Building blocks: one mechanism per file, each a plain tensor function plus a thin module."""
