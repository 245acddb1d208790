"""Geospatial building blocks: CRSs and pixel/map conversion, GeoJSON (one reader, one
writer), scene rasters (the one windowed reader), pixel windows and the tile grid,
annotations, and box geometry (IoU, matching, merging).

Imports only :mod:`retrain_lib.core`.
"""
