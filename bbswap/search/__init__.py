"""Search for the cheapest recipe that reaches a target (fit), over many backbones (matrix)."""
