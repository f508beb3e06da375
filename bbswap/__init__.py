"""bbswap: backbone surgery for PyTorch.

Inspect a CNN backbone's stages, patch it to a target downsample factor and channel
count with declarative recipes, and emit the patched network as Python source.
"""

__version__ = "0.1.0"
