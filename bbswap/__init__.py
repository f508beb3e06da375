"""bbswap: backbone surgery for PyTorch."""
