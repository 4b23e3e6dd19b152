"""The example scripts end to end: train.py (tiny towers on synthetic data), evaluate.py (metrics + PNG report,
human judgments), retrieve.py, and the trained folder loading with remote code only (issue 5)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blocked_import import run_without_package
from modeling_bcls import BCLSModel
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train") / "run"
    metrics = load_example("train").main([
        "--data", str(synthetic_dir), "--output_dir", str(output_dir), "--tiny_image_size", "32",
        "--max_steps", "30", "--per_device_train_batch_size", "16", "--eval_strategy", "steps", "--eval_steps", "15",
        "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0",
    ])
    return output_dir, metrics


def test_train_script_saves_a_complete_model_folder(trained):
    output_dir, metrics = trained
    assert metrics["eval_rsum"] > 0 and "eval_kendall_tau_b" in metrics
    names = {p.name for p in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "training_args.json", "all_results.json"} <= names
    assert {"modeling_bcls.py", "configuration_bcls.py", "losses.py"} <= names  # remote code
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))}
    card = (output_dir / "README.md").read_text()
    assert f"{metrics['eval_rsum']:.4g}" in card  # the card reports the final evaluation
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "bcls" and config["auto_map"]["AutoModel"].endswith("BCLSModel")


def test_train_script_flags_override_the_tiny_tower_defaults(synthetic_dir, tmp_path):
    train = load_example("train")
    parser_args = train.TINY_TOWER_DEFAULTS
    assert parser_args["learning_rate"] == 1e-3
    metrics = train.main([
        "--data", str(synthetic_dir), "--output_dir", str(tmp_path / "r"), "--tiny_image_size", "32",
        "--max_steps", "2", "--learning_rate", "0.0", "--eval_split", "", "--use_cpu", "true",
        "--disable_tqdm", "true", "--objective", "vse", "--relevance", "none",
    ])
    state = json.loads((tmp_path / "r" / "trainer_state.json").read_text())
    assert all(entry.get("learning_rate", 0.0) == 0.0 for entry in state["log_history"])
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["binary_loss"], saved["kendall_weight"], saved["objective"]) == ("vse", 0.0, None)
    assert not any(key.startswith("eval_") for key in metrics)


def test_trained_folder_loads_with_remote_code_only(trained, tmp_path):
    output_dir, _ = trained
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = BCLSModel.from_pretrained(output_dir).eval().encode_image(pixel_values=pixel_values)
    save_file({"pixel_values": pixel_values, "expected": expected}, str(tmp_path / "check.safetensors"))
    stdout = run_without_package(
        """
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel

        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        check = load_file(sys.argv[2])
        with torch.no_grad():
            features = model.encode_image(pixel_values=check["pixel_values"])
        print("MAX_DIFF", (features - check["expected"]).abs().max().item())
        """,
        [str(output_dir), str(tmp_path / "check.safetensors")],
        tmp_path,
    )
    assert float(stdout.split("MAX_DIFF")[1]) <= 1e-6


def test_evaluate_script_writes_metrics_report_and_judgment_correlation(trained, synthetic_dir, tmp_path):
    output_dir, _ = trained
    dataset = json.loads((Path(synthetic_dir) / "dataset_synthetic.json").read_text())
    test_images = [entry["filename"] for entry in dataset["images"] if entry["split"] == "test"]
    judgments = tmp_path / "expert.txt"
    judgments.write_text(
        f"{test_images[0]}\t{test_images[0]}#0\t4\t4\t3\n"
        f"{test_images[0]}\t{test_images[1]}#2\t1\t1\t2\n"
        f"{test_images[1]}\t{test_images[2]}#1\t2\t1\t1\n"
        f"{test_images[1]}\tnot_in_split.jpg#0\t3\n"
    )
    metrics = load_example("evaluate").main([
        "--model", str(output_dir), "--dataset", str(synthetic_dir), "--split", "test",
        "--judgments", str(judgments), "--output_dir", str(tmp_path / "eval"),
    ])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert {"rsum", "i2t_r1", "t2i_r10", "kendall_tau_b", "ndcg@10"} <= metrics.keys()
    assert metrics["judgments_num_pairs"] == 9 and metrics["judgments_num_missing"] == 1
    assert -1.0 <= metrics["judgments_kendall_tau_c"] <= 1.0
    with Image.open(tmp_path / "eval" / "report.png") as report:
        assert report.format == "PNG" and report.width > 500 and report.height > 500


def test_retrieve_script_ranks_images_and_captions(trained, synthetic_dir, tmp_path):
    output_dir, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((Path(synthetic_dir) / "images").iterdir())[:4]
    for path in source:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"not an image")
    output = load_example("retrieve").main([
        "--model", str(output_dir), "--images", str(images), "--query", "a red circle", "--query", "a blue square",
        "--image", str(source[0]), "--captions", "a red circle", "a blue square", "a green triangle", "--top_k", "3",
    ])
    for hits in output["text_to_image"].values():
        assert len(hits) == 3 and all(Path(path).name != "broken.png" for path, _ in hits)
        assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
    assert sorted(caption for caption, _ in output["image_to_text"]) == ["a blue square", "a green triangle",
                                                                          "a red circle"]


def test_evaluate_script_extra_positives(trained, synthetic_dir, tmp_path):
    """--extra_positives end to end: ext_ metrics of the listed queries equal loops over the full similarity."""
    from test_map_at_r import brute_ap_rp, brute_first_hit

    from modeling_bcls import BCLSProcessor
    from trainer_bcls import encode_split, load_pairs
    from trainer_bcls.data.caption_index import pair_keys

    output_dir, _ = trained
    pairs = load_pairs(synthetic_dir, "test")
    image_keys, caption_keys = pair_keys(pairs)
    assert caption_keys[0] != f"{image_keys[0]}#0"  # the synthetic Karpathy file has sentids: they are the keys
    extra = {"i2t": {image_keys[0]: [caption_keys[7], caption_keys[12]], image_keys[3]: []},
             "t2i": {caption_keys[2]: [image_keys[5], image_keys[6]]}}
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(extra))
    evaluate = load_example("evaluate")
    common = ["--model", str(output_dir), "--dataset", str(synthetic_dir), "--split", "test", "--relevance", "none",
              "--no_report", "--output_dir", str(tmp_path / "eval")]
    metrics = evaluate.main(common + ["--extra_positives", str(path)])
    plain = evaluate.main(common)
    assert {k: v for k, v in metrics.items() if not k.startswith("ext_")} == pytest.approx(plain)
    assert {"i2t_map_at_r", "t2i_map_at_r", "i2t_r_precision", "t2i_r_precision"} <= plain.keys()
    assert metrics["ext_i2t_num_queries"] == 2 and metrics["ext_t2i_num_queries"] == 1

    model = BCLSModel.from_pretrained(output_dir).eval()
    encoded = encode_split(model, pairs, BCLSProcessor.from_pretrained(output_dir), show_progress=False)
    sim = (encoded.image_embeds @ encoded.text_embeds.T).numpy()
    ids = encoded.caption_image_ids
    rows = {key: i for i, key in enumerate(image_keys)}, {key: i for i, key in enumerate(caption_keys)}
    for direction, mat, (queries, gallery) in (("i2t", sim, rows), ("t2i", sim.T, rows[::-1])):
        aps, rps, firsts = [], [], []
        for key, items in extra[direction].items():
            q = queries[key]
            binary = set(np.flatnonzero(ids == q).tolist()) if direction == "i2t" else {int(ids[q])}
            positive = binary | {gallery[item] for item in items}
            ap, rp = brute_ap_rp(mat[q], positive, len(positive))
            aps.append(ap)
            rps.append(rp)
            firsts.append(brute_first_hit(mat[q], positive))
        assert metrics[f"ext_{direction}_map_at_r"] == pytest.approx(100 * np.mean(aps), abs=1e-4)
        assert metrics[f"ext_{direction}_r_precision"] == pytest.approx(100 * np.mean(rps), abs=1e-4)
        assert metrics[f"ext_{direction}_r1"] == pytest.approx(100 * np.mean(np.asarray(firsts) <= 1))


@pytest.mark.parametrize("content,message", [
    ("{not json", r"extra\.json: not valid JSON"),
    ('{"i2t": {"no_such_image.png": []}}', r"extra\.json: i2t query 'no_such_image\.png' is not an image key"),
    ('{"t2i": {"__CAPTION__": ["nope.png"]}}', r"extra\.json: t2i\['\w+'\] lists 'nope\.png', not an image key"),
    ('{"i2x": {}}', r"extra\.json: expected .*\['i2x'\]"),
])
def test_evaluate_script_bad_extra_positives(trained, synthetic_dir, tmp_path, capsys, content, message):
    from trainer_bcls import load_pairs
    from trainer_bcls.data.caption_index import pair_keys

    output_dir, _ = trained
    caption_key = pair_keys(load_pairs(synthetic_dir, "test"))[1][0]
    path = tmp_path / "extra.json"
    path.write_text(content.replace("__CAPTION__", caption_key))
    with pytest.raises(SystemExit) as exit_info:
        load_example("evaluate").main([
            "--model", str(output_dir), "--dataset", str(synthetic_dir), "--split", "test", "--relevance", "none",
            "--no_report", "--output_dir", str(tmp_path / "eval"), "--extra_positives", str(path),
        ])
    assert str(exit_info.value).startswith("error: ")
    assert re.search(message, str(exit_info.value))
