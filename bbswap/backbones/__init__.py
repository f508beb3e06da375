"""Resolve a backbone spec: the zoo, torchvision, timm and users' own files; checkpoints."""
