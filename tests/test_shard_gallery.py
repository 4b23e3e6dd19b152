"""A gallery of webdataset shards (issue 22 items 3-4): shards built from the synthetic data in a temp folder are
indexed by sample key, like the same images as files, and split between 2 processes by shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_parallel_index import _index, assert_same_index, model_dir  # noqa: F401 (a fixture)
from trainer_bcls.data.errors import InvalidDataError
from trainer_bcls.retrieval.image_sources import FolderSource
from trainer_bcls.retrieval.index import RetrievalModel, build_index



def _write_shards(images: list[Path], folder: Path, per_shard: int) -> str:
    """Webdataset shards of the images (`<key>.png` + `<key>.json` captions); returns their brace pattern."""
    import io
    import tarfile

    folder.mkdir(parents=True)
    shards = [images[i : i + per_shard] for i in range(0, len(images), per_shard)]
    for number, shard in enumerate(shards):
        with tarfile.open(folder / f"shard-{number:06d}.tar", "w") as archive:
            for path in shard:
                for name, data in ((f"{path.stem}.png", path.read_bytes()),
                                   (f"{path.stem}.json", json.dumps({"captions": ["a scene"]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")


def test_a_shard_gallery_is_keyed_by_sample_and_split_by_shard(model_dir, synthetic_dir, tmp_path):
    from trainer_bcls.retrieval.image_sources import open_image_source
    from trainer_bcls.retrieval.shard_source import ShardSource

    files = sorted((synthetic_dir / "images").glob("test_*.png"))[:10]
    pattern = _write_shards(files, tmp_path / "shards", per_shard=4)
    source = open_image_source(pattern)
    assert isinstance(source, ShardSource) and source.keys == [f.stem for f in files]
    assert [list(source.share(r, 2)) for r in range(2)] == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]  # shards 0, 2 | 1
    np.testing.assert_array_equal(np.asarray(source.load(5)), np.asarray(Image.open(files[5]).convert("RGB")))
    model = RetrievalModel.from_pretrained(str(model_dir), "cpu")
    by_shard, _ = build_index(model, source, tmp_path / "idx", show_progress=False)
    by_file, _ = build_index(model, FolderSource(synthetic_dir / "images"), None, show_progress=False)
    rows = {Path(p).stem: e for p, e in zip(by_file.paths, by_file.embeddings)}
    torch.testing.assert_close(by_shard.embeddings, torch.stack([rows[k] for k in by_shard.paths]), atol=1e-6, rtol=0)

    (tmp_path / "shards" / "shard-000001.tar").write_bytes(b"not a tar archive" * 64)  # a corrupt shard is named
    with pytest.raises(InvalidDataError, match=r"shard .*shard-000001\.tar"):
        open_image_source(pattern)


@pytest.mark.multiprocess
def test_two_processes_index_shards_like_one(model_dir, synthetic_dir, tmp_path):
    files = sorted((synthetic_dir / "images").glob("val_*.png"))[:12]
    pattern = _write_shards(files, tmp_path / "shards", per_shard=3)
    _index(model_dir, pattern, tmp_path / "single")
    summary, rates = _index(model_dir, pattern, tmp_path / "double", processes=2, tmp=tmp_path)
    assert (summary["images"], [r["images"] for r in rates]) == (12, [6])  # shards 1 and 3
    assert_same_index(tmp_path / "single", tmp_path / "double")
