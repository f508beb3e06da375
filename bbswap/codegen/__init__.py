"""Write a patched backbone as Python source, bundle what it needs, export the files."""
