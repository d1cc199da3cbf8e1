"""docs/families.md is generated from the tests' family tables: it must not go stale."""

from families import DOC, families_doc


def test_families_doc_is_generated_from_the_test_tables():
    assert DOC.read_text() == families_doc(), "run: python tests/families.py"
