"""Fetch stage: URL images through img2dataset behind the guarded web layer, local images from archives."""
