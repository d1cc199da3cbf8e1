import pytest
from families import family_params


@pytest.fixture(scope="module", params=family_params())
def family(request) -> str:
    """Every supported family, one module-scoped parametrisation shared by the ir tests
    (all but `families.FAST_FAMILIES` marked slow)."""
    return request.param
