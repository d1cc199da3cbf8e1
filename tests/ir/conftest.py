import pytest
from families import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    """Every supported family, one module-scoped parametrisation shared by the ir tests."""
    return request.param
