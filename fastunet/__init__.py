"""fastunet (stub while building)."""
