"""``make test``'s hand-out order (conftest.SLOWEST_FILES) names test files that exist."""

from pathlib import Path

from conftest import SLOWEST_FILES


def test_the_slowest_files_listed_exist_once_each():
    here = Path(__file__).parent
    assert [name for name in SLOWEST_FILES if not (here / name).is_file()] == []
    assert len(set(SLOWEST_FILES)) == len(SLOWEST_FILES)
