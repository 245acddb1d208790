"""The foundation every layer stands on: errors, config models, storage and its layout,
settings, local file primitives, devices, class names and terminal output.

Imports nothing from the layers above.
"""
