"""WebDataset shards: pattern expansion, reading samples (jpg + txt, jpg + json with several captions), bad input."""

import io
import json
import tarfile
from pathlib import Path

import PIL.Image
import pytest

from trainer_bcls.data.errors import InvalidDataError, SkipReport
from trainer_bcls.data.shard_writer import karpathy_shard_samples, write_shards
from trainer_bcls.data.shards import expand_braces, expand_shard_pattern, iter_shard_samples
from trainer_bcls.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train_images=10, num_val_images=2, num_test_images=2,
        captions_per_image=3, image_size=32,
    )


def jpeg_samples(synth: Path) -> list[dict]:
    """The synthetic train split as shard samples, images re-encoded as JPEG."""
    samples = []
    for sample in karpathy_shard_samples(synth / "dataset_synthetic.json", synth / "images", "train"):
        buffer = io.BytesIO()
        PIL.Image.open(sample["image"]).convert("RGB").save(buffer, format="JPEG")
        samples.append({**sample, "image": buffer.getvalue(), "image_ext": "jpg"})
    return samples


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_brace_expansion():
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("{5..3}")
    with pytest.raises(ValueError, match="neither"):
        expand_braces("{abc}")


def test_expand_shard_pattern_local_urls_and_errors(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    expected = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_shard_pattern(pattern) == expected
    assert expand_shard_pattern(str(tmp_path)) == expected  # a folder: its .tar files
    assert expand_shard_pattern(str(tmp_path / "*.tar")) == expected
    assert expand_shard_pattern(f"{expected[0]}::{expected[2]}") == [expected[0], expected[2]]
    urls = expand_shard_pattern("https://host/data/s-{00..01}.tar")
    assert urls == ["https://host/data/s-00.tar", "https://host/data/s-01.tar"]  # URLs kept, not checked
    with pytest.raises(InvalidDataError, match="matches no local file"):
        expand_shard_pattern(str(tmp_path / "other-{0..1}.tar"))
    with pytest.raises(InvalidDataError, match="1 missing shard"):
        expand_shard_pattern(str(tmp_path / "shard-{000000..000003}.tar"))


@pytest.mark.parametrize("caption_format", ["txt", "json"])
def test_read_shards(tmp_path, synth, caption_format):
    samples = jpeg_samples(synth)
    paths = write_shards(samples, tmp_path, samples_per_shard=4, caption_format=caption_format)
    assert len(paths) == 3  # 10 samples: 4 + 4 + 2
    read = list(iter_shard_samples(str(tmp_path / "shard-{000000..000002}.tar")))
    assert [s["key"] for s in read] == [s["key"] for s in samples]
    for got, want in zip(read, samples):
        assert got["image"] == want["image"] and got["image_ext"] == "jpg"
        assert got["captions"] == (want["captions"][:1] if caption_format == "txt" else want["captions"])
    assert len(read[0]["captions"]) == (1 if caption_format == "txt" else 3)
    decoded = next(iter_shard_samples(paths, decode_images=True))
    assert isinstance(decoded["image"], PIL.Image.Image) and decoded["image"].size == (32, 32)


def test_caption_sources(tmp_path):
    jpg = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(jpg, format="JPEG")
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as archive:
        add(archive, "a.jpg", jpg.getvalue())
        add(archive, "a.json", json.dumps(["one", "two"]).encode())
        add(archive, "b.png", jpg.getvalue())
        add(archive, "b.json", json.dumps({"caption": "from meta", "url": "x"}).encode())
        add(archive, "c.jpg", jpg.getvalue())
        add(archive, "c.txt", b"  from txt \n")
        add(archive, "c.json", json.dumps({"caption": "ignored", "width": 4}).encode())
    got = {s["key"]: s["captions"] for s in iter_shard_samples([str(path)])}
    assert got == {"a": ["one", "two"], "b": ["from meta"], "c": ["from txt"]}


def bad_shard(tmp_path: Path) -> Path:
    jpg = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(jpg, format="JPEG")
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as archive:
        add(archive, "ok1.jpg", jpg.getvalue())
        add(archive, "ok1.txt", b"fine")
        add(archive, "noimage.txt", b"caption only")
        add(archive, "nocaption.jpg", jpg.getvalue())
        add(archive, "corrupt.jpg", b"not a jpeg")
        add(archive, "corrupt.txt", b"broken image")
        add(archive, "ok2.jpg", jpg.getvalue())
        add(archive, "ok2.txt", b"fine too")
    return path


def test_bad_samples_named_or_skipped(tmp_path):
    path = str(bad_shard(tmp_path))
    with pytest.raises(InvalidDataError, match=r"bad.tar, sample 'noimage': no image"):
        list(iter_shard_samples([path]))
    report = SkipReport()
    keys = [s["key"] for s in iter_shard_samples([path], skip_invalid=True, report=report)]
    assert keys == ["ok1", "corrupt", "ok2"]  # bytes are not decoded: the corrupt image passes here
    assert report.counts == {"sample without an image or caption": 2}
    only_corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(only_corrupt, "w") as archive:
        add(archive, "corrupt.jpg", b"not a jpeg")
        add(archive, "corrupt.txt", b"broken image")
    with pytest.raises(InvalidDataError, match=r"corrupt.tar, sample 'corrupt'"):
        list(iter_shard_samples([str(only_corrupt)], decode_images=True))
    report = SkipReport()
    keys = [s["key"] for s in iter_shard_samples([path], decode_images=True, skip_invalid=True, report=report)]
    assert keys == ["ok1", "ok2"] and report.counts["unreadable image"] == 1


def test_unreadable_and_truncated_shards(tmp_path, synth):
    paths = write_shards(jpeg_samples(synth), tmp_path / "good", samples_per_shard=5)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 10)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:5000])  # inside a member
    with pytest.raises(InvalidDataError, match="garbage.tar"):
        list(iter_shard_samples([str(garbage)]))
    with pytest.raises(InvalidDataError, match=r"truncated.tar.*unreadable"):
        list(iter_shard_samples([str(truncated)]))
    report = SkipReport()
    keys = [s["key"] for s in iter_shard_samples([str(garbage), str(truncated), paths[1]], skip_invalid=True,
                                                  report=report)]
    # the samples read before the break are kept, the rest of the truncated shard is skipped
    assert keys == ["train_00000"] + [f"train_{i:05d}" for i in range(5, 10)]
    assert report.counts["unreadable shard"] == 2


def test_fsspec_urls(tmp_path, synth):
    """A URL pattern is expanded, not checked locally, and opened through fsspec (here its in-memory filesystem)."""
    import fsspec

    paths = write_shards(jpeg_samples(synth), tmp_path, samples_per_shard=5)
    memory = fsspec.filesystem("memory")
    for i, path in enumerate(paths):
        memory.pipe(f"/bcls-test/s-{i}.tar", Path(path).read_bytes())
    try:
        urls = expand_shard_pattern("memory://bcls-test/s-{0..1}.tar")
        assert urls == ["memory://bcls-test/s-0.tar", "memory://bcls-test/s-1.tar"]
        assert [s["key"] for s in iter_shard_samples(urls)] == [f"train_{i:05d}" for i in range(10)]
        with pytest.raises(InvalidDataError, match=r"s-7.tar.*unreadable"):
            list(iter_shard_samples(["memory://bcls-test/s-7.tar"]))
    finally:
        memory.rm("/bcls-test", recursive=True)
