"""Trace a backbone on the meta device: stages, reduction points, size rules, reports."""
