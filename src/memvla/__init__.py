"""memvla: efficient, memory-augmented Vision-Language-Action robot policies.

Axis letters used in shape comments across the code base are listed in
:mod:`memvla.glossary`.
"""

__version__ = "0.1.0"
