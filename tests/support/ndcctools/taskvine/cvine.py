"""TEST-ONLY stand-in (see __init__.py)."""
VINE_DEFAULT_PORT = 9123
