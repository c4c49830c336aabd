"""Data files shipped inside the package (the ImageNet-1k class list)."""
