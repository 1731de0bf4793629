"""Compositions of the building blocks: decoder stacks, the VLM, the VLAs."""
