"""Configuration: recipes, YAML files and the schemas they are checked against. No torch."""
