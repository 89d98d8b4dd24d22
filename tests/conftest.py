import pytest
import torch

from methods.segmenter import build_model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def small_model():
    """A 4-block model on 8x8 patches: fast, but deep enough to pause or merge in."""
    return build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32).eval()


class ToyDataset(torch.utils.data.Dataset):
    """Random images whose label is a function of colour, so a model can learn it."""

    classes = ("a", "b", "c")
    ignore_index = 255

    def __init__(self, n=16, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.labels = (self.images[:, 0].long() * 3 // 256)
        self.labels[:, :2, :2] = 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.fixture
def toy_dataset():
    return ToyDataset()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Fingerprint caches (bench.datasets.fingerprint) go to a folder of the test session."""
    import os

    old = os.environ.get("BENCH_CACHE_DIR")
    os.environ["BENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("bench-cache"))
    yield
    if old is None:
        os.environ.pop("BENCH_CACHE_DIR", None)
    else:
        os.environ["BENCH_CACHE_DIR"] = old
