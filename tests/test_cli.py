"""The `qzoom` command end to end on the tiny model: outputs, schema and every exit code."""

import json
import os
import subprocess
import sys

import pytest
import torch
from docmaker import make_encrypted_pdf, make_image, make_pdf
from typer.testing import CliRunner

from qzoom_cli import cli
from qzoom_cli.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_USAGE,
    ModelNotAvailable,
    UsageError,
)

runner = CliRunner()

RESULT_SCHEMA = {
    "schema": str, "run": (dict, type(None)), "id": str, "status": str, "question": str, "answer": str,
    "reasoning": type(None), "page": int, "error": type(None),
    "warnings": [str],
    "input": {"file": str, "sha256": str, "kind": str, "pages": [int], "dpi": (int, type(None)), "warnings": [str]},
    "candidates": [{"page": int, "answer": str, "score": float, "output_tokens": int, "visual_tokens": int,
                    "truncated": bool, "zoomed": bool}],
    "zoom": {"mode": str, "zoomed": bool, "region_head": (str, type(None)), "gate": (dict, type(None)),
             "roi": (dict, type(None)), "skipped_reason": (str, type(None)), "positions": (str, type(None)),
             "region_rule": (str, type(None)), "direct_answer": (str, type(None)), "zoom_answer": (str, type(None)), "overlay": (str, type(None))},
    "model": {"id": str, "revision": (str, type(None)), "family": str, "device": str, "dtype": str, "attn": str,
              "decoder": str},
    "budget": {"min_tokens": int, "max_tokens": int, "visual_tokens": int, "roi_tokens": int, "roi_max_tokens": int},
    "stats": {"latency_s": float, "visual_tokens": int, "coarse_visual_tokens": int, "region_visual_tokens": int,
              "baseline_visual_tokens": int, "prompt_tokens": int, "output_tokens": int,
              "tokens_per_s": float, "total_visual_tokens": int, "total_prompt_tokens": int,
              "total_output_tokens": int, "peak_mem_gib": float, "peak_mem_source": str,
              "time": {"render_s": float, "preprocess_s": float, "coarse_prefill_s": float, "gate_s": float,
                       "region_s": float, "region_encode_s": float, "fused_prefill_s": float, "decode_s": float}},
}


def check_schema(value, schema, where="record"):
    if isinstance(schema, dict):
        assert isinstance(value, dict) and set(value) == set(schema), f"{where}: keys {sorted(value)}"
        for key, sub in schema.items():
            check_schema(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{where}[{i}]")
    else:
        assert isinstance(value, schema) and not (isinstance(value, bool) and schema in (int, float)), \
            f"{where}: {value!r} is not {schema}"


def ask(tiny_dir, *args, **kwargs):
    defaults = ["--model", str(tiny_dir), "--device", "cpu", "--max-visual-tokens", "64",
                "--min-visual-tokens", "16", "--max-new-tokens", "4", "--dpi", "72"]
    return runner.invoke(cli.app, ["ask", *defaults, *args], **kwargs)  # later flags win


def test_plain_answers_one_line_per_question(tiny_dir, pdf_path):
    result = ask(tiny_dir, str(pdf_path), "What is the total due?", "What is the date?", "-q")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr == ""


def test_json_records_follow_the_schema(tiny_dir, pdf_path):
    result = ask(tiny_dir, str(pdf_path), "total?", "date?", "--json", "--pages", "1-2")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2"]
    for record in records:
        check_schema(record, RESULT_SCHEMA)
        assert record["schema"] == "qzoom.result/v1" and record["input"]["pages"] == [1, 2]
        assert record["budget"]["max_tokens"] == 64 and record["budget"]["visual_tokens"] <= 64


def test_json_is_deterministic_apart_from_timings(tiny_dir, pdf_path):
    def strip(record):
        record.pop("stats")
        return record

    outs = [strip(json.loads(ask(tiny_dir, str(pdf_path), "total?", "--json").stdout)) for _ in range(2)]
    assert outs[0] == outs[1]


def test_stdin_document(tiny_dir):
    result = ask(tiny_dir, "-", "total?", "--json", input=make_pdf(2))
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["input"]["file"] == "-" and record["input"]["pages"] == [1, 2]


def test_encrypted_pdf_with_password(tiny_dir, tmp_path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(make_encrypted_pdf("pw"))
    assert ask(tiny_dir, str(path), "q?").exit_code == EXIT_INPUT
    assert ask(tiny_dir, str(path), "q?", "--password", "pw").exit_code == 0


@pytest.mark.parametrize("args,code,message", [
    (["{missing}", "q?"], EXIT_INPUT, "no such file"),
    (["{notes}", "q?"], EXIT_INPUT, "not a PDF or a supported image"),
    (["{corrupt}", "q?"], EXIT_INPUT, "not a readable PDF"),
    (["{locked}", "q?"], EXIT_INPUT, "encrypted"),
    (["{pdf}", "q?", "--pages", "7"], EXIT_INPUT, "out of range"),
    (["{pdf}", "  "], EXIT_USAGE, "empty question"),
    (["{pdf}", "q?", "--pages", "0"], EXIT_USAGE, "numbered from 1"),
    (["{pdf}", "q?", "--dtype", "fp8"], EXIT_USAGE, "unknown dtype"),
    (["{pdf}", "q?", "--device", "tpu"], EXIT_USAGE, "device"),
    (["{pdf}", "q?", "--device", "cuda:3"], EXIT_MODEL, "CUDA"),
])
def test_error_exit_codes(tiny_dir, tmp_path, args, code, message):
    files = {"missing": tmp_path / "missing.pdf", "notes": tmp_path / "notes.txt", "corrupt": tmp_path / "bad.pdf",
             "locked": tmp_path / "locked.pdf", "pdf": tmp_path / "ok.pdf"}
    files["notes"].write_text("plain text")
    files["corrupt"].write_bytes(b"%PDF-1.7\n\x00\x01 broken")
    files["locked"].write_bytes(make_encrypted_pdf())
    files["pdf"].write_bytes(make_pdf(2))
    result = ask(tiny_dir, *[a.format(**files) for a in args])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qzoom: error:") and message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_model_not_available_offline(pdf_path, tmp_path):
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", "nobody/no-such-model", "--device", "cpu"])
    assert result.exit_code == EXIT_MODEL
    assert len(result.stderr.strip().splitlines()) == 1
    for fix in ("HF_HUB_OFFLINE=1", "qzoom models pull nobody/no-such-model", "--model", "qzoom models make-tiny"):
        assert fix in result.stderr
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", "./no/such/dir", "--device", "cpu"])
    assert result.exit_code == EXIT_MODEL and "does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", str(tmp_path / "empty"), "--device", "cpu"])
    assert result.exit_code == EXIT_MODEL and "is not a loadable checkpoint" in result.stderr
    assert "hf download" not in result.stderr  # a local folder is not the hub's business


def test_hub_failures_name_their_fix(monkeypatch):
    from huggingface_hub import constants

    from qzoom_cli.backbones import not_available

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    message = not_available("Qwen/Qwen3-VL-4B-Instruct", None, unreachable).message
    assert message.startswith("cannot reach the Hugging Face hub") and "qzoom models pull Qwen/Qwen3-VL-4B-Instruct" in message
    refused = not_available("nobody/x", "v2", OSError("nobody/x is not a valid model identifier")).message
    assert "nobody/x@v2" in refused and "hf auth login" in refused and "not a valid model identifier" in refused


def test_unsupported_family_is_a_model_error(tmp_path, pdf_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llama")
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", str(tmp_path / "llama")])
    assert result.exit_code == EXIT_MODEL and "not supported" in result.stderr


def test_interrupt_and_internal_error_exit_codes(tiny_dir, pdf_path, monkeypatch):
    from qzoom_cli import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.QZoom, "ask", interrupted)
    result = ask(tiny_dir, str(pdf_path), "q?")
    assert result.exit_code == EXIT_INTERRUPTED and "interrupted" in result.stderr

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api.QZoom, "ask", broken)
    result = ask(tiny_dir, str(pdf_path), "q?")
    assert result.exit_code == EXIT_INTERNAL
    assert result.stderr.strip() == "qzoom: internal error: RuntimeError: boom (rerun with -v for details)"
    verbose = ask(tiny_dir, str(pdf_path), "q?", "-v")
    assert verbose.exit_code == EXIT_INTERNAL and "Traceback" in verbose.stderr


def test_unsupported_transformers_is_an_environment_error(tiny_dir, pdf_path, monkeypatch):
    from qzoom_cli import doctor

    monkeypatch.setattr(doctor, "package_version", lambda name: "4.51.3")
    result = ask(tiny_dir, str(pdf_path), "q?")
    assert result.exit_code == EXIT_MODEL and "transformers 4.51.3" in result.stderr


def test_missing_arguments_are_usage_errors():
    assert runner.invoke(cli.app, ["ask"]).exit_code == EXIT_USAGE
    assert runner.invoke(cli.app, ["ask", "doc.pdf", "q", "--no-such-flag"]).exit_code == EXIT_USAGE


def test_doctor_json():
    result = runner.invoke(cli.app, ["doctor", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["hub"]["offline"] is True and report["packages"]["transformers"]
    assert {"device": "cpu"}.items() <= report["devices"][-1].items()
    assert isinstance(report["flash_attention"], bool) and report["transformers_ok"] is True
    text = runner.invoke(cli.app, ["doctor"])
    assert text.exit_code == 0 and "hub cache" in text.stdout and "offline: True" in text.stdout


def test_models_list_and_make_tiny(tmp_path):
    listed = runner.invoke(cli.app, ["models", "list", "--json"])
    cards = json.loads(listed.stdout)["models"]
    assert sum(card["default"] for card in cards) == 1
    factors = {"qwen2_5_vl": 28, "qwen3_vl": 32, "qwen3_vl_moe": 32, "qwen3_5": 32, "qwen3_5_moe": 32, "llava": 14}
    assert all(card["patch_factor"] == factors[card["family"]] for card in cards)
    assert {"YuhengSSS/Q-Zoom-Qwen3VL-4B", "Qwen/Qwen3-VL-30B-A3B-Instruct", "llava-hf/llava-1.5-7b-hf",
            "llava-hf/llava-1.5-13b-hf"} <= {card["id"] for card in cards}
    made = runner.invoke(cli.app, ["models", "make-tiny", str(tmp_path / "t"), "--layers", "2", "--seed", "3"])
    assert made.exit_code == 0 and made.stdout.strip() == str(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    llava_cards = {card["id"]: card for card in cards if card["family"] == "llava"}
    assert {card["zoom"]["branch_layer"] for card in llava_cards.values()} == {15, 19}  # SD-RPN's K on the 7B
    assert all(card["system_prompt"] is None and  # the family's vicuna_v1 system text
               card["min_visual_tokens"] == card["max_visual_tokens"] == 576 for card in llava_cards.values())
    llava = runner.invoke(cli.app, ["models", "make-tiny", str(tmp_path / "l"), "--family", "llava", "--layers", "2"])
    assert llava.exit_code == 0 and json.loads((tmp_path / "l" / "config.json").read_text())["model_type"] == "llava"
    bad = runner.invoke(cli.app, ["models", "make-tiny", str(tmp_path / "u"), "--family", "nope"])
    assert bad.exit_code == EXIT_USAGE


@pytest.mark.processes
def test_console_script_runs_as_a_real_process(tiny_dir, pdf_path):
    """The installed entry point, a real process: stdout carries only the JSON, exit codes are real."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["--model", str(tiny_dir), "--device", "cpu", "--max-visual-tokens", "32", "--max-new-tokens", "2"]
    done = subprocess.run(["qzoom", "ask", str(pdf_path), "total?", "--json", *common],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["input"]["kind"] == "pdf"
    missing = subprocess.run([sys.executable, "-m", "qzoom_cli", "ask", "missing.pdf", "q?", *common],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == EXIT_INPUT and missing.stderr.startswith("qzoom: error: no such file")
    version = subprocess.run(["qzoom", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("qzoom ")


def test_zoom_always_reports_the_region_and_writes_an_overlay(tiny_dir, pdf_path, tmp_path):
    result = ask(tiny_dir, str(pdf_path), "total?", "--json", "--zoom", "always", "--pages", "2",
                 "--explain", "--overlay", str(tmp_path / "ov"), "--roi-max-visual-tokens", "40")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    check_schema(record, RESULT_SCHEMA)
    zoom, stats = record["zoom"], record["stats"]
    assert zoom["mode"] == "always" and zoom["zoomed"] and zoom["region_head"] == "base_layers"
    roi = zoom["roi"]
    assert roi["page"] == 2 and roi["coord_space"] == "page_px@72dpi"
    x0, y0, x1, y1 = roi["bbox_xyxy"]
    assert 0 <= x0 < x1 <= 595 and 0 <= y0 < y1 <= 842
    assert roi["bbox_norm"] == [round(x0 / 595, 4), round(y0 / 842, 4), round(x1 / 595, 4), round(y1 / 842, 4)]
    assert 0 < roi["tokens"] == stats["region_visual_tokens"] == record["budget"]["roi_tokens"] <= 40
    assert stats["visual_tokens"] == stats["coarse_visual_tokens"] + stats["region_visual_tokens"]
    assert stats["time"]["region_encode_s"] > 0 and stats["time"]["fused_prefill_s"] > 0
    assert zoom["zoom_answer"] == record["answer"] and isinstance(zoom["direct_answer"], str)
    assert zoom["overlay"] and (tmp_path / "ov" / "doc-q1-p2.png").is_file()
    never = json.loads(ask(tiny_dir, str(pdf_path), "total?", "--json", "--zoom", "never", "--pages", "2").stdout)
    assert never["zoom"]["zoomed"] is False and never["answer"] == zoom["direct_answer"]


def test_adapter_flag_and_zoom_errors(tiny_dir, pdf_path, tmp_path, qz):
    from zoomkit import trained_adapter

    trained_adapter(qz.backbone).save_pretrained(tmp_path / "adapter")
    result = ask(tiny_dir, str(pdf_path), "total?", "--json", "--adapter", str(tmp_path / "adapter"),
                 "--gate-threshold", "0", "--roi-threshold", "0")
    assert result.exit_code == 0, result.stderr
    zoom = json.loads(result.stdout)["zoom"]
    assert zoom["region_head"] == "trained" and zoom["gate"]["kind"] == "trained" and zoom["zoomed"]
    missing = ask(tiny_dir, str(pdf_path), "q?", "--adapter", str(tmp_path / "nope"))
    assert missing.exit_code == EXIT_MODEL and "adapter folder" in missing.stderr and "does not exist" in missing.stderr
    bad = ask(tiny_dir, str(pdf_path), "q?", "--zoom", "sometimes")
    assert bad.exit_code == EXIT_USAGE and "unknown zoom mode" in bad.stderr


@pytest.mark.parametrize("flag,value", [("--gate-threshold", "nan"), ("--gate-threshold", "-1"),
                                        ("--roi-threshold", "-1"), ("--roi-threshold", "2"),
                                        ("--roi-threshold", "inf")])
def test_meaningless_thresholds_are_usage_errors(pdf_path, tiny_dir, flag, value):
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", str(tiny_dir), "--device", "cpu",
                                     flag, value])
    assert result.exit_code == EXIT_USAGE and flag in result.stderr


def test_device_from_the_environment(monkeypatch):
    from qzoom_cli.runtime import resolve_device

    monkeypatch.setenv("QZOOM_DEVICE", "cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv("QZOOM_DEVICE", "tpu")
    with pytest.raises(UsageError, match="tpu"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit --device wins


def test_gpus_that_are_not_there_and_bench_limits(tmp_path, tiny_dir):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "file": "x.pdf", "question": "q?"}\n')
    if torch.cuda.device_count() < 8:
        gpus = runner.invoke(cli.app, ["run", str(manifest), "--gpus", "0,7"])
        assert gpus.exit_code == EXIT_USAGE and "CUDA GPU" in gpus.stderr
    for limit in ("0", "-1"):
        bench = runner.invoke(cli.app, ["bench", str(manifest), "--limit", limit, "--out", str(tmp_path / "b")])
        assert bench.exit_code == EXIT_USAGE and "--limit" in bench.stderr


@pytest.mark.parametrize("removed,named", [("tokenizer.json", "no tokenizer"),
                                           ("preprocessor_config.json", "no image processor")])
def test_a_model_folder_without_processor_files_is_a_model_error(pdf_path, tiny_dir, tmp_path, removed, named):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(tiny_dir, folder)
    (folder / removed).unlink()
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", str(folder), "--device", "cpu"])
    assert result.exit_code == EXIT_MODEL and named in result.stderr and str(folder) in result.stderr


def _damage_model(folder, damage):
    """Break a copy of the tiny checkpoint one way."""
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    config = json.loads((folder / "config.json").read_text())
    if damage == "more layers":  # the config describes a deeper model than the weights hold
        config["text_config"]["num_hidden_layers"] *= 2
        config["text_config"].pop("layer_types", None)
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "layer count disagrees":
        config["text_config"]["num_hidden_layers"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "a tensor missing":
        del tensors["model.layers.0.mlp.gate_proj.weight"]
    elif damage == "a tensor too many":
        tensors["model.extra.weight"] = torch.zeros(2)
    elif damage == "a tensor misshapen":
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][1:]
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "garbage tokenizer":
        (folder / "tokenizer.json").write_text("garbage{")
    elif damage == "garbage image processor":
        (folder / "preprocessor_config.json").write_text("[1, 2")
    elif damage == "template syntax":
        (folder / "chat_template.jinja").write_text("{% for x in %}")
    elif damage == "garbage config":
        (folder / "config.json").write_text("{not json")
    if damage.startswith("a tensor"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    ("more layers", "the weights of {m} do not match its config.json: 48 missing (e.g. model.language_model.layers.4."),
    ("layer count disagrees", "the config.json of {m} is not a valid model config (StrictDataclassClassValidationError: "
                              "Class validation error for validator 'validate_layer_type': ValueError: "
                              "`num_hidden_layers` (8) must be equal to the number of `layer_types` (4))"),
    ("a tensor missing", "the weights of {m} do not match its config.json: 1 missing (e.g. "
                         "model.language_model.layers.0.mlp.gate_proj.weight); qzoom never runs a model with random "
                         "weights"),
    ("a tensor too many", "1 unexpected (e.g. model.language_model.extra.weight)"),
    ("a tensor misshapen", "1 misshapen (e.g. model.language_model.embed_tokens.weight)"),
    ("truncated weights", "the weights of {m} are damaged (model.safetensors: Error while deserializing header:"),
    ("empty weights", "the weights of {m} are damaged (model.safetensors: "),
    ("garbage tokenizer", "the tokenizer of {m} is damaged (JSONDecodeError: "),
    ("garbage image processor", "the image processor of {m} is damaged (OSError: "),
    ("template syntax", "the chat template of {m} does not work (Expected an expression"),
    ("garbage config", "the config.json of {m} is not a valid model config (OSError: "),
])
def test_a_damaged_or_mismatched_model_folder_is_a_model_error_naming_what(pdf_path, tiny_dir, tmp_path, damage,
                                                                           message):
    """Never random weights, never an internal error: exit 4 and the one thing that is wrong."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    _damage_model(folder, damage)
    result = runner.invoke(cli.app, ["ask", str(pdf_path), "q?", "--model", str(folder), "--device", "cpu"])
    assert result.exit_code == EXIT_MODEL, result.stderr
    assert result.stderr.startswith("qzoom: error: ") and len(result.stderr.splitlines()) == 1
    assert message.format(m=folder) in result.stderr


def test_control_characters_never_reach_a_terminal_raw():
    from qzoom_cli.render import printable

    assert printable("total\x1b[2J $5\x07\n\tdue\x9b") == "total\\x1b[2J $5\\x07 due\\x9b"
    assert printable("Zürich – 3 €") == "Zürich – 3 €"


def test_help_shows_every_default():
    result = runner.invoke(cli.app, ["ask", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "[default: the default model card]" in text and "[default: all]" in text
    assert "--dpi N PDF render resolution; boxes are in pixels at this DPI. [default: 200]" in text  # typer's too
    assert "--json Print JSON instead of text. [default: (off)]" in text  # a flag: no type, its default said
    assert "<" not in result.stdout  # no Python types: <str>, <list[str]>, <bool>


@pytest.mark.processes
@pytest.mark.parametrize("args", [
    ["ask", "{pdf}", "q", "--dpi", "0"],
    ["ask", "{pdf}", "q", "--pages", "3-1"],
    ["ask", "{pdf}", "q", "--min-visual-tokens", "900", "--max-visual-tokens", "100"],
    ["ask", "{pdf}", "q", "--max-visual-tokens", "0"],
    ["ask", "{pdf}", "q", "--max-new-tokens", "0"],
    ["ask", "{pdf}", "q", "--gate-threshold", "nan"],
    ["run", "{manifest}", "--batch-size", "0"],
    ["run", "{manifest}", "--min-visual-tokens", "-4"],
    ["eval", "{manifest}", "--compare", "never,sometimes"],
    ["eval", "{manifest}", "--max-new-tokens", "0"],
    ["bench", "{manifest}", "--budgets", "0"],
    ["bench", "{manifest}", "--batch-size", "x"],
    ["train", "gate", "--json", "{manifest}", "--out", "{manifest}.d", "--epochs", "0"],
    ["train", "gate", "--json", "{manifest}", "--out", "{manifest}.d", "--ladder", "64,32,16"],
    ["train", "rpn", "--json", "{manifest}", "--out", "{manifest}.d", "--view-tokens", "50"],
    ["train", "rpn", "--json", "{manifest}", "--out", "{manifest}"],
    ["ask", "{pdf}", "q", "--max-visual-tokens", "2000000"],
    ["ask", "{pdf}", "q", "--min-visual-tokens", "2000000"],
    ["ask", "{pdf}", "q", "--instruction", "x" * 5000],
    ["ask", "{pdf}", "x" * 9000],
    ["ask", "{pdf}", "q", "--max-new-tokens", "100000"],
    ["run", "{manifest}", "--dpi", "0"],
    ["run", "{manifest}", "--dpi", "5000"],
    ["run", "{manifest}", "-o", "{manifest}.out", "--resume", "--force"],
    ["run", "{manifest}", "-o", "{pdf}"],
])
def test_usage_errors_come_before_the_ml_libraries(args, tmp_path, pdf_path):
    """A bad flag is answered at once (exit 2) without importing torch or transformers."""
    import subprocess

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"file": str(pdf_path), "question": "q"}) + "\n")
    argv = [a.format(pdf=pdf_path, manifest=manifest) for a in args] + ["--model", "/nowhere"]
    script = ("import sys\nfrom qzoom_cli.cli import main\nsys.argv = ['qzoom', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
              "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(EXIT_USAGE), "False", "False"], done.stderr
    assert done.stderr.startswith("qzoom: error:")


@pytest.mark.processes
@pytest.mark.parametrize("args, code, message", [
    (["ask", "{pdf}", "q", "--model", "{tmp}/no-model"], EXIT_MODEL, "model directory {tmp}/no-model does not exist"),
    (["ask", "{pdf}", "q", "--model", "{tmp}"], EXIT_MODEL, "model folder {tmp} is not a loadable checkpoint"),
    (["ask", "{pdf}", "q", "--model", "nobody/not-cached"], EXIT_MODEL,
     "nobody/not-cached is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"),
    (["ask", "{pdf}", "q", "--model", "{tmp}/m", "--adapter", "{tmp}/no-adapter"], EXIT_MODEL,
     "adapter folder {tmp}/no-adapter does not exist"),
    (["run", "{manifest}", "-o", "{done}"], EXIT_USAGE, "{done} already has results: --resume to continue it"),
    (["serve", "--model", "{tmp}/no-model"], EXIT_MODEL, "does not exist"),
    (["train", "rpn", "--json", "{manifest}", "-o", "{tmp}/out", "--model", "{tmp}/no-model"], EXIT_MODEL, "does not exist"),
])
def test_what_can_be_refused_without_the_ml_libraries_is_refused_before_them(args, code, message, tmp_path,
                                                                              pdf_path):
    """A missing model or adapter folder, a model not cached offline, a finished result file: one
    line at once, not after seconds of importing torch."""
    manifest, done = tmp_path / "m.jsonl", tmp_path / "done.jsonl"
    manifest.write_text(json.dumps({"file": str(pdf_path), "question": "q"}) + "\n")
    done.write_text('{"id": "row1", "status": "ok"}\n')
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # a model folder, as far as can be told without loading it
    values = {"pdf": pdf_path, "manifest": manifest, "tmp": tmp_path, "done": done}
    script = ("import sys\nfrom qzoom_cli.cli import main\nsys.argv = ['qzoom', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
              "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done_run = subprocess.run([sys.executable, "-c", script, *(a.format(**values) for a in args)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done_run.stdout.split() == [str(code), "False", "False"], done_run.stderr
    assert done_run.stderr.startswith("qzoom: error: ") and message.format(**values) in done_run.stderr


def test_an_unreachable_hub_means_the_cache_at_once(monkeypatch):
    """No resolvable hub host: this process goes offline (a cached model loads without retries),
    and a model that is not cached is reported as the hub being out of reach."""
    import socket

    from huggingface_hub import constants

    from qzoom_cli import backbones, refs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(refs, "_went_offline", False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelNotAvailable, match="cannot reach the Hugging Face hub"):
        refs.check_local_refs("nobody/not-cached")  # before any ML library: at once
    assert constants.HF_HUB_OFFLINE
    with pytest.raises(ModelNotAvailable, match="cannot reach the Hugging Face hub"):
        backbones.detect_family("nobody/not-cached")


def test_overlays_that_cannot_be_written_keep_the_answers(tiny_dir, pdf_path, tmp_path, monkeypatch):
    import errno

    from qzoom_cli import render
    from qzoom_cli.errors import EXIT_OUTPUT

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(render, "write_overlay", full)
    result = ask(tiny_dir, str(pdf_path), "total?", "--pages", "1", "--overlay", str(tmp_path / "ov"), "--json")
    assert result.exit_code == EXIT_OUTPUT
    record = json.loads(result.stdout)
    assert record["status"] in ("ok", "truncated") and record["zoom"]["overlay"] is None
    assert any("overlay not written" in w for w in record["warnings"])
    assert "could not write the overlays" in result.stderr


def _record(tiny_dir, path, *flags):
    result = ask(tiny_dir, str(path), "What is the total due?", "--pages", "1", "--json", *flags)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_every_budget_and_region_option_does_what_it_says(tiny_dir, pdf_path, tmp_path):
    """Each --*-visual-tokens and --roi-* flag, through the command, changes what its help promises and
    the record states the value used."""
    small = _record(tiny_dir, pdf_path, "--zoom", "never", "--max-visual-tokens", "24", "--min-visual-tokens", "8")
    large = _record(tiny_dir, pdf_path, "--zoom", "never", "--max-visual-tokens", "96", "--min-visual-tokens", "8")
    assert 8 <= small["stats"]["visual_tokens"] <= 24 < large["stats"]["visual_tokens"] <= 96
    assert (small["budget"]["min_tokens"], small["budget"]["max_tokens"]) == (8, 24)
    (tmp_path / "small.png").write_bytes(make_image("PNG", size=(112, 84)))  # about 12 tokens as it is
    natural = _record(tiny_dir, tmp_path / "small.png", "--zoom", "never", "--min-visual-tokens", "4")
    floor = _record(tiny_dir, tmp_path / "small.png", "--zoom", "never", "--min-visual-tokens", "40")
    assert natural["stats"]["visual_tokens"] < 40 <= floor["stats"]["visual_tokens"] <= 64

    always = ("--zoom", "always", "--roi-threshold", "0")
    wide = _record(tiny_dir, pdf_path, *always, "--roi-max-visual-tokens", "60")
    narrow = _record(tiny_dir, pdf_path, *always, "--roi-max-visual-tokens", "12")
    assert wide["zoom"]["zoomed"] and narrow["zoom"]["zoomed"]
    assert narrow["stats"]["region_visual_tokens"] <= 12 < wide["stats"]["region_visual_tokens"] <= 60
    assert (narrow["budget"]["roi_max_tokens"], wide["budget"]["roi_max_tokens"]) == (12, 60)
    assert wide["zoom"]["roi"]["grid_box"] == [0, 0, *reversed(wide["zoom"]["roi"]["grid"])]  # cut-off 0: all

    strict = _record(tiny_dir, pdf_path, "--zoom", "always", "--roi-threshold", "0.9")
    box = strict["zoom"]["roi"]["grid_box"]
    assert strict["zoom"]["roi"]["threshold"] == 0.9
    assert (box[2] - box[0]) * (box[3] - box[1]) < wide["zoom"]["roi"]["grid"][0] * wide["zoom"]["roi"]["grid"][1]

    lift = _record(tiny_dir, pdf_path, "--zoom", "auto", "--gate-threshold", "0")["zoom"]["gate"]
    assert lift["kind"] == "attention_lift" and lift["threshold"] == 0
    below = _record(tiny_dir, pdf_path, "--zoom", "auto", "--gate-threshold", str(lift["score"] - 1e-3))
    above = _record(tiny_dir, pdf_path, "--zoom", "auto", "--gate-threshold", str(lift["score"] + 1e-3))
    assert below["zoom"]["zoomed"] and not above["zoom"]["zoomed"]
    assert above["zoom"]["skipped_reason"] == "attention too spread out for a region to help"


@pytest.mark.parametrize("args, line", [
    (["ask", "doc.pdf", "q", "--dpi", "abc"], "Invalid value for '--dpi': Input should be a valid integer, unable to "
                                              "parse string as an integer (see qzoom ask --help)"),
    (["ask", "doc.pdf", "q", "--no-such-flag"], "No such option: --no-such-flag (see qzoom ask --help)"),
    (["run"], "Missing argument 'manifest'. (see qzoom run --help)"),
    (["nosuch"], "No such command 'nosuch'. (see qzoom --help)"),
    (["ask", "-notes.pdf", "q"], "No such option: -n; -notes.pdf is a file: put it after '--' so it is not read as an "
                                 "option (qzoom ask -- -notes.pdf ...), or write ./-notes.pdf"),
])
def test_what_the_parser_cannot_read_is_one_error_line(args, line, tmp_path, monkeypatch, capsys):
    """As the README promises for every error: `qzoom: error: ...` on stderr, exit 2, no usage box."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-notes.pdf").write_bytes(make_pdf(1))
    monkeypatch.setattr(sys, "argv", ["qzoom", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    assert (exited.value.code, captured.out, captured.err) == (EXIT_USAGE, "", f"qzoom: error: {line}\n")


def _fake_cache(root, repo_id: str, files: dict[str, bytes]):
    """A Hugging Face cache holding `files` of `repo_id`, laid out as the hub lays it out."""
    import hashlib

    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def test_models_list_says_which_cards_are_cached_and_their_size(tmp_path, monkeypatch):
    from huggingface_hub import constants

    _fake_cache(tmp_path, "Qwen/Qwen2.5-VL-7B-Instruct", {"config.json": b"{}", "model.safetensors": b"x" * 250_000})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cards = {c["id"]: c for c in json.loads(runner.invoke(cli.app, ["models", "list", "--json"]).stdout)["models"]}
    assert cards["Qwen/Qwen2.5-VL-7B-Instruct"]["cached"] and cards["Qwen/Qwen2.5-VL-7B-Instruct"]["size_on_disk"] \
        == 250_002
    assert not cards["Qwen/Qwen3-VL-8B-Instruct"]["cached"] and cards["Qwen/Qwen3-VL-8B-Instruct"]["size_on_disk"] is None
    table = runner.invoke(cli.app, ["models", "list"]).stdout
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in table and "cached 0.3 MB" in table and "not cached" in table
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "none"))  # no cache at all yet
    assert not any(c["cached"] for c in json.loads(runner.invoke(cli.app, ["models", "list", "--json"]).stdout)["models"])


def test_only_what_a_checkpoint_needs_is_pulled():
    from qzoom_cli.pull import pull_patterns

    assert "*.bin" not in pull_patterns(["config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin"])
    assert "*.bin" in pull_patterns(["config.json", "pytorch_model.bin", "tokenizer.model"])  # old LLaVA releases
    assert {"*.json", "*.safetensors", "*.jinja", "*.model"} <= set(pull_patterns([]))


def test_models_pull_checks_the_family_before_the_weights_and_says_what_it_fetches(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.file_download import DryRunFileInfo

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    config, fetched = tmp_path / "config.json", []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, ref, revision=None: ["config.json", "model.safetensors", "model.bin"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda ref, name, revision=None: str(config))

    def snapshot_download(ref, revision=None, allow_patterns=None, dry_run=False):
        if dry_run:
            return [DryRunFileInfo("c", 2_000_000_000, "model.safetensors", "", False, True),
                    DryRunFileInfo("c", 1000, "config.json", "", True, False)]
        fetched.append((ref, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config.write_text(json.dumps({"model_type": "whisper"}))
    refused = runner.invoke(cli.app, ["models", "pull", "openai/whisper-tiny"])
    assert refused.exit_code == EXIT_MODEL and "is a 'whisper' model, which qzoom does not run" in refused.stderr
    assert fetched == []  # nothing but its config was downloaded
    config.write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    pulled = runner.invoke(cli.app, ["models", "pull", "Qwen/Qwen2.5-VL-3B-Instruct", "--revision", "v1"])
    assert pulled.exit_code == 0, pulled.stderr
    assert pulled.stdout == f"{tmp_path / 'snapshot'}\n"
    assert "qzoom: Qwen/Qwen2.5-VL-3B-Instruct: 2 files, 2.00 GB (2.00 GB to download)" in pulled.stderr
    [(ref, revision, patterns)] = fetched
    assert (ref, revision) == ("Qwen/Qwen2.5-VL-3B-Instruct", "v1") and "*.bin" not in patterns


def test_models_pull_offline_or_of_a_folder_says_why_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = runner.invoke(cli.app, ["models", "pull", "Qwen/Qwen2.5-VL-3B-Instruct"])
    assert offline.exit_code == EXIT_MODEL and "while HF_HUB_OFFLINE=1" in offline.stderr
    folder = runner.invoke(cli.app, ["models", "pull", str(tmp_path)])
    assert folder.exit_code == EXIT_USAGE and "is a local folder" in folder.stderr


def test_help_is_plain_wrapped_and_spells_each_flag_one_way():
    """-h too; at 80 columns nothing is cut; one spelling per flag (old ones still read, not shown);
    what a value is, not its Python type; one default seed for every training stage."""
    for args in (["-h"], ["ask", "-h"], ["models", "-h"], ["train", "-h"], ["models", "pull", "-h"]):
        shown = runner.invoke(cli.app, args, env={"COLUMNS": "80"})
        assert shown.exit_code == 0 and shown.stdout.startswith("Usage: qzoom")
        assert all(len(line) <= 80 for line in shown.stdout.splitlines()) and "…" not in shown.stdout
    ask_help = runner.invoke(cli.app, ["ask", "-h"], env={"COLUMNS": "80"}).stdout
    assert "Usage: qzoom ask [OPTIONS] PATH QUESTIONS..." in ask_help and "--zoom auto|always|never" in ask_help
    assert "--pages PAGES" in ask_help and "--page-range" not in ask_help and "{path}" not in ask_help
    for command in (["bench"], ["train", "rpn"], ["train", "gate"], ["train", "sft"], ["train", "all"],
                    ["train", "questions"], ["run"], ["eval"]):
        text = runner.invoke(cli.app, [*command, "-h"], env={"COLUMNS": "100"}).stdout
        assert "-o, --output " in text and "--out " not in text, command
        if command[0] == "train" and command[1] != "questions":
            assert "[default: 42]" in " ".join(text[text.index("--seed"):].split()[:8]), command
        if command[0] in ("bench", "train") and command[-1] != "questions" or command[0] == "eval":
            assert "--json" in text, command
    assert "--limit N" in runner.invoke(cli.app, ["eval", "-h"]).stdout
