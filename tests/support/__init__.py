"""Plain helpers that the tests import (fixtures live in each folder's conftest.py)."""
