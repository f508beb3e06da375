"""Check an emitted or hand-edited backbone file by round trip."""
