"""Operating the service: pricing arithmetic, billing, lineage and economics (torch-free)."""
