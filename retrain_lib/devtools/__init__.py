"""Tools around the product: synthetic georeferenced scenes, the demo, and the local stack
behind ``autoretrain up``."""
