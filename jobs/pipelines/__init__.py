"""The jobs themselves: each a Ray pipeline (or a streaming pass) composed from the floors below."""
