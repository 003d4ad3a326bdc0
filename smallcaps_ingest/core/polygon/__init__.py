"""The Polygon (Massive) v3 API: the request budget shared by every process and host."""
