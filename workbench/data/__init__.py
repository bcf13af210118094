"""Training and eval data: sources, BIG-bench items, formatting and collation."""
