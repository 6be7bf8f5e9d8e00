"""Identity resolution: the identity graph, its merge policy (pure) and, later, its service."""
