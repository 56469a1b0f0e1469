"""Hugging Face folders as users have them (save_pretrained: config.json + model.safetensors), planned directly:
a decoder LM with GQA and a tied head saved in bfloat16, and an encoder classifier."""

import json
from pathlib import Path

import pytest
import torch

from planner.cli.commands import main
from planner.core.errors import PlannerError
from planner.models.sources import resolve_source


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import BertConfig, BertForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=2000,
                                      tie_word_embeddings=True, max_position_embeddings=512))
    lm.to(torch.bfloat16).save_pretrained(root / "qwen")  # a bf16 checkpoint; lm_head omitted (tied)
    classifier = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=128, vocab_size=1000))
    classifier.save_pretrained(root / "bert")
    return {"root": root, "qwen": root / "qwen", "bert": root / "bert"}


def test_folder_builds_float32_with_the_head_tied(folders: dict[str, Path]) -> None:
    source = resolve_source(str(folders["qwen"]))
    assert source.kind == "hf"
    meta = source.build("meta")
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # one tensor, as in the model
    real = source.build("cpu")
    assert real.lm_head.weight is real.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in real.parameters())  # the reference is fp32, not the checkpoint's bf16
    (inputs,) = source.example_inputs()
    assert inputs.dtype == torch.int64 and tuple(inputs.shape) == (1, 128)


def test_folder_plan_figures_match_the_files(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["plan", str(folders["qwen"]), "--budget", "50MB", "--budget-on", "runtime", "--backend", "torch",
                 "--recipes", "fp32,bf16", "--out", str(out)])
    assert code == 0
    rows = {row["recipe"]: row for row in json.loads((out / "plan.json").read_text())["rows"]}
    checkpoint = (folders["qwen"] / "model.safetensors").stat().st_size
    for name, bytes_per_value in (("fp32", 4), ("bf16", 2)):
        row = rows[name]
        assert row["status"] == "verified"
        assert abs(row["analytic_disk_bytes"] / row["verified_disk_bytes"] - 1) < 0.02
        # the tied head is stored once: about the checkpoint's bf16 bytes scaled to this dtype
        assert abs(row["verified_disk_bytes"] / (checkpoint * bytes_per_value / 2) - 1) < 0.05


def test_encoder_classifier_folder(folders: dict[str, Path]) -> None:
    source = resolve_source(str(folders["bert"]))
    assert type(source.build("meta")).__name__ == "BertForSequenceClassification"


def test_refusals_are_one_line(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pickled = folders["root"] / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folders["bert"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    remote = folders["root"] / "remote"
    remote.mkdir()
    config = json.loads((folders["bert"] / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
    (remote / "model.safetensors").write_bytes((folders["bert"] / "model.safetensors").read_bytes())
    for spec, expected in ((pickled, "only as a pickle"), (remote, "--trust-code"),
                           ("hf:nobody/not-cached", "never downloads")):
        with pytest.raises(PlannerError, match=expected):
            resolve_source(str(spec))
        assert main(["plan", str(spec), "--budget", "1MB"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    with pytest.raises(PlannerError, match="drop --weights"):
        resolve_source(str(folders["bert"]), weights=str(folders["bert"] / "model.safetensors"))


def test_a_config_alone_is_enough_for_an_analytic_only_plan(folders: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A published shape whose weights are not here: config.json alone plans --analytic-only (and inspects), and
    the figures are those of the folder with its weights; a plan that would verify still asks for the weights."""
    shape_only = folders["root"] / "shape-only"
    shape_only.mkdir()
    (shape_only / "config.json").write_text((folders["qwen"] / "config.json").read_text())
    with pytest.raises(PlannerError, match="no model.safetensors"):
        resolve_source(str(shape_only))
    figures = {}
    for name, folder in (("shape", shape_only), ("full", folders["qwen"])):
        out = tmp_path / name
        assert main(["plan", str(folder), "--budget", "50MB", "--budget-on", "runtime", "--analytic-only",
                     "--recipes", "fp32,int4-g128", "--out", str(out)]) == 0
        figures[name] = [(row["recipe"], row["analytic_disk_bytes"], row["analytic_runtime_bytes"])
                         for row in json.loads((out / "plan.json").read_text())["rows"]]
    assert figures["shape"] == figures["full"] and all(disk and runtime for _, disk, runtime in figures["shape"])
    assert main(["inspect", str(shape_only)]) == 0
    capsys.readouterr()
